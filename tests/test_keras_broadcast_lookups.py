"""Issue 12 item 1 (Keras): lookups broadcast over the batch.

Keras-Hub's ``PositionEmbedding`` (and so ``TokenAndPositionEmbedding``) is no Embedding
subclass: it slices its (sequence_length, D) table and broadcasts it to the (B, T, D) shape of its
input. capture() finds such layers, recovers which rows each output position holds and taps the
already-broadcast output: exact per-example gradients, checked against a per-example
GradientTape loop (eager and inside tf.function) and on Keras 3 over PyTorch. keras-hub itself
needs tensorflow-text, which pins the full ``tensorflow`` package beside this project's
``tensorflow-cpu``, so ``keras_position_layers.py`` holds a faithful copy of its two layers.

A plain ``keras.layers.Embedding`` looked up with position ids of batch size 1 (or none) and
broadcast by the model's own ``+`` / ``*``: TensorFlow has no tensor subclass through which
embgrad could see the broadcast, so the gradient of the (1, T, D) output is split by the examples
of the model's output (row b: d(g_b · y_b)/d(output), g = dLoss/dy; tape.jacobian), exact against
a per-example GradientTape loop; a use of the output outside the model's output (add_loss) is
refused, and so is a batch-size-1 lookup outside any forward (its batch size cannot be known),
each with how to pass the ids, never a batch of 1. On Keras over PyTorch the torch backend's
per-example views do it."""
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
X = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 1]])


class TokAndPos(keras.Model):
    """Token + position embedding; ``form``: how the position ids are shaped and used."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.tok = keras.layers.Embedding(V, D, name="tok")
        self.pos = keras.layers.Embedding(P, D, name="pos")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[1])
        if self.form == "batch1":                        # (1, T), added
            h = self.tok(x) + self.pos(positions[None])
        elif self.form == "nobatch":                     # (T,), added
            h = self.tok(x) + self.pos(positions)
        elif self.form == "mul":                         # (1, T), multiplied, first operand
            h = keras.ops.multiply(self.pos(positions[None]), self.tok(x))
        elif self.form == "expand":                      # the ids broadcast to (B, T) by the model
            h = self.tok(x) + self.pos(keras.ops.broadcast_to(positions[None], keras.ops.shape(x)))
        elif self.form == "add_loss":                    # also used outside the model's output
            pe = self.pos(positions[None])
            h = self.tok(x) + pe
            self.add_loss(tf.reduce_sum(pe ** 2))
        return self.head(tf.reduce_mean(tf.tanh(h) ** 2, axis=1))


def _loss(model, x):
    loss = tf.reduce_sum(model(x) * tf.constant([1.0, -2.0, 0.5]))
    return loss + tf.add_n(model.losses) if model.losses else loss


def _model(form):
    keras.utils.set_random_seed(0)
    m = TokAndPos(form)
    m(X)
    return m


def _loop(model, x, table):
    ref = []
    for b in range(len(x)):
        with tf.GradientTape() as tape:
            lb = _loss(model, x[b:b + 1])
        ref.append(tf.convert_to_tensor(tape.gradient(lb, table)).numpy())
    return np.stack(ref)


@pytest.mark.parametrize("form", ["batch1", "nobatch", "mul", "expand"])
@pytest.mark.parametrize("layers", [None, "pos"])
def test_broadcast_positions_exact_per_example(form, layers):
    """Position ids of batch size 1 (or none) broadcast by the model's own `+` / `*`: split by
    the examples of the model's output, equal to a per-example GradientTape loop."""
    model = _model(form)
    with embgrad.capture(model, layers=layers) as cap:
        loss = _loss(model, X)
    g = cap.gradients(loss)
    pe = g["pos"].per_example()
    ref = _loop(model, X, model.pos.embeddings)
    assert pe.batch_size == len(X)
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(pe.norms().numpy(), np.linalg.norm(ref.reshape(len(X), -1), axis=1), rtol=1e-5)
    np.testing.assert_allclose(g["pos"].weight_grad.to_dense().numpy(), ref.sum(0), atol=1e-6)
    if layers is None:
        np.testing.assert_allclose(g["tok"].per_example().to_dense().numpy(),
                                   _loop(model, X, model.tok.embeddings), atol=1e-6)
    assert "call" not in model.__dict__ and "call" not in model.pos.__dict__


def test_broadcast_output_also_used_outside_the_models_output_is_refused():
    model = _model("add_loss")
    with embgrad.capture(model) as cap:
        loss = _loss(model, X)
    g = cap.gradients(loss)
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*batch has 3 examples.*another way.*relative size.*"
                                           r"keras.ops.broadcast_to\(ids, \(3, T\)\)"):
        g["pos"].per_example()
    # the summed gradient needs no examples: it is exact
    with tf.GradientTape() as tape:
        ref_loss = _loss(model, X)
    np.testing.assert_allclose(g["pos"].weight_grad.to_dense().numpy(),
                               tf.convert_to_tensor(tape.gradient(ref_loss, model.pos.embeddings)).numpy(),
                               atol=1e-6)


def test_batch_one_lookup_outside_any_forward_is_refused_not_a_batch_of_one():
    """The position layer called outside the captured model's forward, its output broadcast by
    the caller: embgrad sees neither the broadcast nor a forward's batch size."""
    model = _model("batch1")
    with embgrad.capture(model, layers="pos") as cap:
        pe = model.pos(np.arange(3)[None])
        loss = tf.reduce_sum(tf.tanh(model.tok(X) + pe) ** 2)
    g = cap.gradients(loss).only()
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*cannot tell the batch size.*outside.*forward.*"
                                           r"keras.ops.broadcast_to\(ids, \(B, T\)\)"):
        g.per_example()


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

# a plain Embedding looked up with position ids of batch size 1 (or none): the torch backend's
# per-example views of the broadcast; a use that cannot be split is refused
from embgrad import EmbgradError
V, P, D = 10, 4, 2
X = np.array([[1, 2, 3], [4, 5, 6]])
class TokAndPos(keras.Model):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.tok = keras.layers.Embedding(V, D, name="tok")
        self.pos = keras.layers.Embedding(P, D, name="pos")
    def call(self, x):
        T = keras.ops.shape(x)[1]
        if self.form == "batch1":
            h = self.tok(x) + self.pos(keras.ops.arange(T)[None])
        elif self.form == "nobatch":
            h = self.tok(x) + self.pos(keras.ops.arange(T))
        elif self.form == "ops_add":
            h = keras.ops.add(self.pos(keras.ops.arange(T)[None]), self.tok(x))
        elif self.form == "also_sum":
            pe = self.pos(keras.ops.arange(T)[None])
            h = self.tok(x) + pe + keras.ops.sum(pe)
        return (torch.tanh(h) * torch.tensor([0.5, 2.0])) ** 2
for form in ["batch1", "nobatch", "ops_add", "also_sum"]:
    keras.utils.set_random_seed(0)
    m = TokAndPos(form)
    m(X)
    with embgrad.capture(m) as cap:
        loss = m(X).sum()
    g = cap.gradients(loss)
    w = m.pos.embeddings.value
    ref = torch.stack([torch.autograd.grad(m(X[b:b + 1]).sum(), w)[0] for b in range(2)])
    torch.testing.assert_close(g["pos"].weight_grad.to_dense(), ref.sum(0))
    if form == "also_sum":
        try:
            g["pos"].per_example()
            raise SystemExit("no error")
        except EmbgradError as e:
            assert "layer 'pos'" in str(e) and "ALSO used" in str(e), e
    else:
        pe = g["pos"].per_example()
        assert pe.batch_size == 2
        torch.testing.assert_close(pe.to_dense(), ref)
    assert "call" not in m.pos.__dict__ and "call" not in m.__dict__
print("OK")
'''


@pytest.mark.slow
def test_keras_on_torch_position_embedding_exact(tmp_path):
    """Keras 3 on PyTorch (a subprocess: a Keras backend is fixed per process): the rows a
    sliced position table's output holds come from a double backward over the call's graph, and
    a plain Embedding's batch-free output gets the torch backend's per-example views; per-example
    gradients equal a per-example autograd loop."""
    import subprocess
    import sys

    script = tmp_path / "keras_torch_positions.py"
    script.write_text(KERAS_TORCH)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# --- traced functions: a broadcast over the batch is refused even where T == B; a per-example
# --- (B,) lookup whose output gets a new axis AFTER its ids' axis still works (newcomer #8)

def _pos_model_traced():
    import keras
    import tensorflow as tf

    class PosEmb(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.pos = keras.layers.Embedding(8, 4, name="pos")

        def call(self, x):
            return x + self.pos(tf.range(tf.shape(x)[1]))[None]

    keras.utils.set_random_seed(3)
    inp = keras.Input((None,), dtype="int32")
    tok = keras.layers.Embedding(20, 4, name="tok")
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(PosEmb()(tok(inp))))
    return keras.Model(inp, out)


@pytest.mark.parametrize("sig", [(5, 5), (None, None)])
def test_traced_position_ids_with_t_equal_b_are_refused(sig):
    import tensorflow as tf

    import embgrad
    model = _pos_model_traced()
    ids = np.random.default_rng(0).integers(0, 20, (5, 5)).astype(np.int32)

    @tf.function(input_signature=[tf.TensorSpec(sig, tf.int32)])
    def f(x):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model(x) ** 2)
        return cap.gradients(loss)["pos"].per_example().norms()

    with pytest.raises(Exception, match="broadcasts its output over the batch") as e:
        f(ids)
    assert "broadcast_to" in str(e.value)


def test_traced_per_example_lookup_with_a_new_inner_axis_still_works():
    import keras
    import tensorflow as tf

    import embgrad
    keras.utils.set_random_seed(4)
    B, T = 5, 5                                     # T == B: sizes alone cannot tell
    user = keras.layers.Embedding(10, 4, name="user")
    item = keras.layers.Embedding(30, 4, name="item")
    head = keras.layers.Dense(1)
    u_in = keras.Input((), dtype="int32")
    s_in = keras.Input((T,), dtype="int32")
    x = keras.ops.expand_dims(user(u_in), 1) * item(s_in)        # (B, 1, D) * (B, T, D)
    model = keras.Model([u_in, s_in], head(keras.ops.mean(x, axis=1)))
    rng = np.random.default_rng(1)
    u = rng.integers(0, 10, (B,)).astype(np.int32)
    s = rng.integers(0, 30, (B, T)).astype(np.int32)

    @tf.function
    def f(u, s):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model([u, s]) ** 2)
        return cap.gradients(loss)["user"].per_example().norms()

    got = f(u, s).numpy()
    var = user.embeddings
    ref = []
    for b in range(B):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(model([u[b:b + 1], s[b:b + 1]]) ** 2)
        ref.append(np.linalg.norm(tf.convert_to_tensor(t.gradient(loss, var)).numpy()))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
