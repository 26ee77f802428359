"""Issue 12 item 1 (Keras): lookups broadcast over the batch.

Keras-Hub's ``PositionEmbedding`` (and so ``TokenAndPositionEmbedding``) is no Embedding
subclass: it slices its (sequence_length, D) table and broadcasts it to the (B, T, D) shape of its
input. capture() finds such layers, recovers which rows each output position holds and taps the
already-broadcast output: exact per-example gradients, checked against a per-example
GradientTape loop (eager and inside tf.function) and on Keras 3 over PyTorch. keras-hub itself
needs tensorflow-text, which pins the full ``tensorflow`` package beside this project's
``tensorflow-cpu``, so ``keras_position_layers.py`` holds a faithful copy of its two layers.

A plain ``keras.layers.Embedding`` looked up with ``positions[None]`` and broadcast by the
model's own ``+``: TensorFlow has no tensor subclass through which embgrad could split the
(1, T, D) output by example, so per_example() refuses with an EmbgradError saying how to pass the
ids (the batch size taken from the model's input), never a batch of 1; with the positions
broadcast to (B, T) by the model, the per-example gradients are exact."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, P, D = 10, 4, 2
X = np.array([[1, 2, 3], [4, 5, 6]])


class TokAndPos(keras.Model):
    def __init__(self, expand):
        super().__init__()
        self.expand = expand
        self.tok = keras.layers.Embedding(V, D, name="tok")
        self.pos = keras.layers.Embedding(P, D, name="pos")

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[1])[None]          # (1, T)
        if self.expand:
            positions = keras.ops.broadcast_to(positions, keras.ops.shape(x))  # (B, T)
        return self.tok(x) + self.pos(positions)


def _loss(model, x):
    return tf.reduce_sum(model(x) ** 2)


def _model(expand):
    keras.utils.set_random_seed(0)
    m = TokAndPos(expand)
    m(X)
    return m


def test_batch_one_positions_refused_not_a_batch_of_one():
    model = _model(expand=False)
    with embgrad.capture(model) as cap:
        loss = _loss(model, X)
    g = cap.gradients(loss)
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*no batch dimension.*keras.ops.broadcast_to\(ids, \(2, T\)\)"):
        g["pos"].per_example()
    # the summed gradient needs no examples: it is exact
    table = model.pos.embeddings
    with tf.GradientTape() as tape:
        ref_loss = _loss(model, X)
    ref = tf.convert_to_tensor(tape.gradient(ref_loss, table)).numpy()
    np.testing.assert_allclose(g["pos"].weight_grad.to_dense().numpy(), ref, atol=1e-6)


def test_broadcast_positions_exact_per_example():
    model = _model(expand=True)
    with embgrad.capture(model) as cap:
        loss = _loss(model, X)
    pe = cap.gradients(loss)["pos"].per_example()
    table = model.pos.embeddings
    ref = []
    for b in range(len(X)):
        with tf.GradientTape() as tape:
            lb = _loss(model, X[b:b + 1])
        ref.append(tf.convert_to_tensor(tape.gradient(lb, table)).numpy())
    ref = np.stack(ref)
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(pe.norms().numpy(), np.linalg.norm(ref.reshape(len(X), -1), axis=1), rtol=1e-5)


# ---------------------------------------------------------------- layers that slice their table
# Keras-Hub's PositionEmbedding is no Embedding subclass: it slices its (sequence_length, D) table
# and broadcasts it to the (B, T, D) shape of its input. capture() finds such layers (a 2-D
# "embeddings" variable), recovers the rows each output position read (a forward-mode derivative
# of the call) and taps the already-broadcast output: exact per-example gradients.
from keras_position_layers import Scaled, ThreeTables, TokenAndPositionEmbedding  # noqa: E402

SEQ, VOCAB, DIM = 7, 11, 4
XT = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9], [10, 1, 1, 2, 3]])


class HubModel(keras.Model):
    def __init__(self, start_index=0, positions=False):
        super().__init__()
        self.emb = TokenAndPositionEmbedding(VOCAB, SEQ, DIM, name="embeddings")
        self.head = keras.layers.Dense(3, name="head")
        self.start_index, self.positions = start_index, positions

    def call(self, x):
        pos = keras.ops.convert_to_tensor([4, 0, 6, 2, 2]) if self.positions else None
        h = keras.ops.tanh(self.emb(x, start_index=self.start_index, positions=pos))
        return self.head(keras.ops.mean(h * h, axis=1))


def _hub_loss(model, x):
    out = model(x)
    return tf.reduce_sum(out * tf.constant([1.0, -2.0, 0.5]))


def _hub_model(**kw):
    keras.utils.set_random_seed(3)
    m = HubModel(**kw)
    m(XT)
    return m


@pytest.mark.parametrize("kw", [{}, {"start_index": 2}, {"positions": True}])
def test_keras_hub_position_embedding_exact_per_example(kw):
    model = _hub_model(**kw)
    found = embgrad.capture(model).layers
    assert sorted(i.name for i in found) == ["position_embedding", "token_embedding"]
    with embgrad.capture(model) as cap:
        loss = _hub_loss(model, XT)
    g = cap.gradients(loss)
    pos = g["position_embedding"]
    table = model.emb.position_embedding.position_embeddings
    assert pos.num_rows == SEQ and pos.dim == DIM and not pos.tied
    want = (np.broadcast_to([4, 0, 6, 2, 2], XT.shape) if kw.get("positions")
            else np.broadcast_to(np.arange(5) + kw.get("start_index", 0), XT.shape))
    np.testing.assert_array_equal(pos.ids.numpy(), want)
    ref = []
    for b in range(len(XT)):
        with tf.GradientTape() as tape:
            lb = _hub_loss(model, XT[b:b + 1])
        ref.append(tf.convert_to_tensor(tape.gradient(lb, table)).numpy())
    ref = np.stack(ref)
    pe = pos.per_example()
    assert pe.batch_size == len(XT)
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(pe.norms().numpy(), np.linalg.norm(ref.reshape(len(XT), -1), axis=1), rtol=1e-5)
    np.testing.assert_allclose(pos.weight_grad.to_dense().numpy(), ref.sum(0), atol=1e-6)
    # the token table beside it is unaffected
    tok = model.emb.token_embedding.embeddings
    with tf.GradientTape() as tape:
        lt = _hub_loss(model, XT)
    np.testing.assert_allclose(g["token_embedding"].weight_grad.to_dense().numpy(),
                               tf.convert_to_tensor(tape.gradient(lt, tok)).numpy(), atol=1e-6)
    assert "call" not in model.emb.position_embedding.__dict__   # the tap is gone


def test_keras_hub_position_embedding_in_tf_function():
    model = _hub_model(start_index=1)
    table = model.emb.position_embedding.position_embeddings

    @tf.function(input_signature=[tf.TensorSpec((None, 5), tf.int32)])
    def norms(x):
        with embgrad.capture(model, layers="position_embedding") as cap:
            loss = _hub_loss(model, x)
        return cap.gradients(loss).only().per_example().norms()

    got = norms(tf.constant(XT, tf.int32)).numpy()
    ref = []
    for b in range(len(XT)):
        with tf.GradientTape() as tape:
            lb = _hub_loss(model, XT[b:b + 1])
        ref.append(np.linalg.norm(tf.convert_to_tensor(tape.gradient(lb, table)).numpy()))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_table_read_other_than_by_selection_is_named_not_captured():
    class M(keras.Model):
        def __init__(self):
            super().__init__()
            self.tok = keras.layers.Embedding(VOCAB, DIM, name="tok")
            self.pos = Scaled(name="scaled_pos")

        def call(self, x):
            t = self.tok(x)
            return t + self.pos(t)

    keras.utils.set_random_seed(0)
    model = M()
    model(XT)
    assert [i.name for i in embgrad.capture(model).layers] == ["tok", "scaled_pos"]
    with pytest.warns(UserWarning, match=r"layer 'scaled_pos'.*other than by returning some of its rows.*"
                                         r"not captured"):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model(XT) ** 2)
    g = cap.gradients(loss)
    assert list(g) == ["tok"]
    with tf.GradientTape() as tape:
        ref_loss = tf.reduce_sum(model(XT) ** 2)
    np.testing.assert_allclose(g["tok"].per_example().sum().to_dense().numpy(),
                               tf.convert_to_tensor(tape.gradient(ref_loss, model.tok.embeddings)).numpy(),
                               atol=1e-6)


def test_uncaptured_tables_are_named():
    class M(keras.Model):
        def __init__(self, extra):
            super().__init__()
            self.emb = ThreeTables(name="bert_embeddings")
            self.extra = keras.layers.Embedding(VOCAB, DIM, name="extra") if extra else None

        def call(self, x):
            h = self.emb(x)
            return h + self.extra(x) if self.extra is not None else h

    x = XT[:, :4] % 10
    alone = M(extra=False)
    alone(x)
    with pytest.raises(EmbgradError, match=r"has no embedding layer.*bert_embeddings.*word_embeddings.*"
                                           r"position_embeddings.*token_type_embeddings"):
        embgrad.capture(alone)
    both = M(extra=True)
    both(x)
    with pytest.warns(UserWarning, match=r"bert_embeddings.*word_embeddings.*position_embeddings.*"
                                         r"token_type_embeddings.*not captured"):
        cap = embgrad.capture(both)
    assert [i.name for i in cap.layers] == ["extra"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embgrad.capture(both, layers="extra")        # named explicitly: nothing to warn about


KERAS_TORCH = r'''
import numpy as np, torch, keras
import embgrad
from keras_position_layers import TokenAndPositionEmbedding
VOCAB, SEQ, DIM = 11, 7, 4
XT = np.array([[1, 2, 3, 4, 0], [5, 6, 7, 8, 9], [10, 1, 1, 2, 3]])
keras.utils.set_random_seed(3)
emb = TokenAndPositionEmbedding(VOCAB, SEQ, DIM, name="embeddings")
head = keras.layers.Dense(3)
w = torch.tensor([1.0, -2.0, 0.5])
def loss_fn(x):
    h = torch.tanh(emb(x, start_index=2))
    return (head((h * h).mean(1)) * w).sum()
loss_fn(XT)
with embgrad.capture(emb) as cap:
    loss = loss_fn(XT)
g = cap.gradients(loss)["position_embedding"]
assert (g.ids.numpy() == np.arange(2, 7)).all() and g.ids.shape == (3, 5)
table = emb.position_embedding.position_embeddings.value
ref = torch.stack([torch.autograd.grad(loss_fn(XT[b:b + 1]), table)[0] for b in range(len(XT))])
pe = g.per_example()
torch.testing.assert_close(pe.to_dense(), ref, rtol=1e-5, atol=1e-7)
torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
assert table.grad is None
print("OK")
'''


@pytest.mark.slow
def test_keras_on_torch_position_embedding_exact(tmp_path):
    """Keras 3 on PyTorch (a subprocess: a Keras backend is fixed per process): the rows a
    sliced position table's output holds come from a double backward over the call's graph;
    per-example gradients equal a per-example autograd loop."""
    import subprocess
    import sys

    script = tmp_path / "keras_torch_positions.py"
    script.write_text(KERAS_TORCH)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_batch_one_positions_alone_take_the_batch_size_from_the_forward():
    """Only the position layer captured: the forward's input gives the batch size (2), so the
    (1, T) lookup is refused with how to pass its ids, never taken as a batch of 1."""
    model = _model(expand=False)
    with embgrad.capture(model, layers="pos") as cap:
        loss = _loss(model, X)
    g = cap.gradients(loss).only()
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*batch has 2 examples.*PositionEmbedding.*"
                                           r"keras.ops.broadcast_to\(ids, \(2, T\)\)"):
        g.per_example()
