"""embgrad.table on Keras 3 (TensorFlow): read, assign through Variable.scatter_update, freeze
rows with a constraint under model.fit (SGD with momentum, Adam, AdamW's decay, a tied
ReversibleEmbedding), LoRA and quantized tables, pretrained vectors, lazy regularisation
against keras.regularizers.L1L2 under tf.GradientTape."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, D, C, B, T = 30, 4, 3, 16, 6


def _model(**emb_kwargs):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(V, D, name="tok", **emb_kwargs),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(C, name="head"),
    ], name="clf")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, C, B)


def test_view_reads_and_writes_the_real_variable_in_place():
    m = _model()
    layer = m.get_layer("tok")
    t = embgrad.table(m, "tok")
    assert (t.num_rows, t.dim, t.dtype, t.lora) == (V, D, "float32", False)
    assert t.variable is layer.embeddings and t.variable is layer._embeddings
    W = layer.embeddings.numpy().copy()
    np.testing.assert_array_equal(t[[3, 1, 3]], W[[3, 1, 3]])
    np.testing.assert_array_equal(t.numpy(), W)
    inner = layer.embeddings.value                               # the tf.Variable behind it
    prev = t.assign([2, 5], np.full((2, D), 0.5))
    np.testing.assert_array_equal(prev, W[[2, 5]])
    assert layer.embeddings.value is inner and layer.embeddings.trainable
    np.testing.assert_array_equal(layer.embeddings.numpy()[[2, 5]], 0.5)
    others = [i for i in range(V) if i not in (2, 5)]
    np.testing.assert_array_equal(layer.embeddings.numpy()[others], W[others])
    # the model sees it at once
    out = m(np.full((1, T), 2))
    ref = layer.embeddings.numpy()[2] @ m.get_layer("head").kernel.numpy() + m.get_layer("head").bias.numpy()
    np.testing.assert_allclose(out.numpy()[0], ref, rtol=1e-5)
    t.assign([2, 5], prev)
    np.testing.assert_array_equal(layer.embeddings.numpy(), W)
    with pytest.raises(EmbgradError, match=r"vectors have shape \(1, 3\) but 1 id of a table of dimension 4"):
        t.assign([1], np.zeros((1, 3)))
    with pytest.raises(EmbgradError, match="id 30 is out of range for a table of 30 rows"):
        t[[30]]


def test_unbuilt_frozen_bfloat16_tables():
    with pytest.raises(EmbgradError, match="is not built yet"):
        embgrad.table(keras.layers.Embedding(5, 2)).variable
    m = _model()
    m.get_layer("tok").trainable = False
    t = embgrad.table(m)
    assert not t.trainable
    with pytest.raises(EmbgradError, match="is frozen \\(not trainable\\)"):
        t.assign([0], np.zeros((1, D)))
    t.assign([0], np.zeros((1, D)), force=True)
    np.testing.assert_array_equal(m.get_layer("tok").embeddings.numpy()[0], 0)
    bf = keras.layers.Embedding(6, 3, dtype="bfloat16")
    bf.build((None,))
    tb = embgrad.table(bf)
    tb.assign([1], np.array([[1.5, -2.0, 0.25]]))
    assert tb.dtype == "bfloat16" and tb[1].dtype == np.float32
    np.testing.assert_array_equal(tb[1], [1.5, -2.0, 0.25])


@pytest.mark.parametrize("make_opt, eager", [
    (lambda: keras.optimizers.SGD(0.5, momentum=0.9), True),
    (lambda: keras.optimizers.Adam(0.05), True),
    (lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1), False),   # decay: the constraint restores
], ids=["sgd_momentum", "adam", "adamw_compiled"])
def test_frozen_rows_bit_identical_under_fit(make_opt, eager):
    m = _model()
    x, y = _data()
    frozen = [0, 3, 7, 11]
    assert set(frozen) <= set(np.unique(x).tolist())
    t = embgrad.table(m)
    before = t.numpy()
    t.freeze(frozen)
    m.compile(optimizer=make_opt(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              run_eagerly=eager)
    m.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = t.numpy()
    np.testing.assert_array_equal(after[frozen], before[frozen])
    touched = sorted(set(np.unique(x).tolist()) - set(frozen))
    assert (after[touched] != before[touched]).any(1).all()
    t.unfreeze()
    assert m.get_layer("tok").embeddings.constraint is None


def test_freeze_keeps_the_layers_own_constraint_and_unfreeze_restores_it():
    m = _model(embeddings_constraint=keras.constraints.NonNeg())
    var = m.get_layer("tok").embeddings
    own = var.constraint
    x, y = _data(1)
    t = embgrad.table(m)
    t.assign([4], -np.ones((1, D)), force=True)                   # a negative frozen row stays negative
    t.freeze([4])
    opt = keras.optimizers.SGD(0.3)
    for _ in range(3):                                             # a custom loop: apply_gradients
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, m(x), from_logits=True))
        opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
    W = var.numpy()
    np.testing.assert_array_equal(W[4], -1.0)
    assert (np.delete(W, 4, axis=0) >= 0).all()                   # the own NonNeg still applies
    t.unfreeze()
    assert var.constraint is own
    # freezing more and unfreezing some re-installs one guard over the layer's own constraint
    t.freeze([1])
    t.freeze([2])
    t.unfreeze([1])
    assert t.frozen_rows.tolist() == [2]
    before = var.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, m(x), from_logits=True))
    opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
    after = var.numpy()
    np.testing.assert_array_equal(after[2], before[2])
    assert 1 in x and (after[1] != before[1]).any()
    t.unfreeze()
    assert var.constraint is own


def test_freeze_a_tied_reversible_embedding_also_its_projection_part():
    keras.utils.set_random_seed(4)
    emb = keras.layers.ReversibleEmbedding(V, D, tie_weights=True, name="tied")
    mix = keras.layers.Dense(D)
    x = np.random.default_rng(5).integers(0, V, (B, T))
    emb(x)
    mix.build((None, T, D))
    t = embgrad.table(emb)
    before = t.numpy()
    t.freeze([1, 2])
    opt = keras.optimizers.Adam(0.05)
    variables = emb.trainable_variables + mix.trainable_variables
    for _ in range(3):
        with tf.GradientTape() as tape:
            logits = emb(mix(emb(x)), reverse=True)
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(x, logits, from_logits=True))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    after = t.numpy()
    np.testing.assert_array_equal(after[[1, 2]], before[[1, 2]])
    assert (after[[0, 3, 4]] != before[[0, 3, 4]]).any(1).all()  # moved (every row is in the projection)
    t.unfreeze()


def test_lora_table_base_and_effective():
    m = _model()
    layer = m.get_layer("tok")
    layer.enable_lora(2)
    layer.lora_embeddings_b.assign(np.random.default_rng(0).normal(size=(2, D)).astype("float32"))
    t = embgrad.table(m)
    assert t.lora and t.variable is layer._embeddings and t.trainable
    base = layer._embeddings.numpy()
    np.testing.assert_array_equal(t[[1, 2]], base[[1, 2]])
    effective = keras.ops.convert_to_numpy(layer.embeddings)        # Keras' own base + s * A @ B
    np.testing.assert_allclose(t.read([1, 2], effective=True), effective[[1, 2]], rtol=1e-6)
    assert not np.allclose(effective, base)
    t.assign([1], np.zeros((1, D)))                                   # writes the base table
    np.testing.assert_array_equal(layer._embeddings.numpy()[1], 0)
    with pytest.raises(EmbgradError, match="has LoRA enabled.*cannot be frozen"):
        t.freeze([1])


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_quantized_table_is_refused_and_reads_dequantized():
    m = _model()
    W = m.get_layer("tok").embeddings.numpy().copy()
    m.quantize("int8")
    t = embgrad.table(m)
    assert t.dtype == "int8"
    with pytest.raises(EmbgradError, match="cannot write float rows into it: it is quantized "
                                           "\\(quantization_mode='int8'.*write the float table before quantizing"):
        t.assign([0], np.zeros((1, D)), force=True)
    np.testing.assert_allclose(t.read([0, 5], effective=True), W[[0, 5]], atol=2e-3)


def test_pretrained_vectors_into_a_keras_table(tmp_path):
    words = ["the", "cat", "sat", "zzz"]
    vecs = np.random.default_rng(0).standard_normal((4, D)).astype(np.float32)
    p = tmp_path / "v.txt"
    p.write_text("".join(w + " " + " ".join(repr(float(x)) for x in v) + "\n" for w, v in zip(words, vecs)))
    vocab = {"[PAD]": 0, "the": 1, "cat": 2, "sat": 3, "dog": 4}
    v = embgrad.load_vectors(p, vocab)
    m = _model()
    t = embgrad.table(m)
    before = t.numpy()
    written = t.assign_vectors(v, missing="zeros")
    after = t.numpy()
    np.testing.assert_array_equal(after[[1, 2, 3]], vecs[:3])
    assert (after[[0, 4, 29]] == 0).all()
    t.assign(*written)
    np.testing.assert_array_equal(t.numpy(), before)


@pytest.mark.parametrize("l1, l2", [(0.01, 0.0), (0.02, 0.05)])
def test_regularize_equals_keras_l1l2_on_touched_rows(l1, l2):
    m = _model()
    x, y = _data()
    x = x % 20                                                       # rows 20..29 untouched
    var = m.get_layer("tok").embeddings
    with embgrad.capture(m) as cap:
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, m(x), from_logits=True))
    g = cap.gradients(loss).only().weight_grad
    lazy = embgrad.regularize(g, embgrad.table(m), l1=l1, l2=l2)
    penalty = keras.regularizers.L1L2(l1=l1, l2=l2)
    with tf.GradientTape() as tape:
        dense_loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, m(x), from_logits=True)) \
            + penalty(var)
    dense = tf.convert_to_tensor(tape.gradient(dense_loss, var)).numpy()
    rows, values = lazy.numpy()
    np.testing.assert_allclose(values, dense[rows], rtol=1e-5, atol=1e-6)
    assert rows.max() < 20 and (dense[20:] != 0).any(1).all()       # dense penalty: every row
