"""Keras 3 on TensorFlow: capture checked against tf.GradientTape on every model shape the issue
lists (Sequential, functional with several inputs, subclassed, nested), mask_zero, LoRA,
constraints, ReversibleEmbedding with tied weights, per-example gradients, sources=, and the
bad-input catalogue. The model must be left exactly as it was."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError
from embgrad.lowrank import lora_gradients

V, D, C, B, T = 30, 4, 3, 5, 6


def _ids(seed=0, V=V, B=B, T=T):
    ids = np.random.default_rng(seed).integers(1, V, (B, T))
    ids[0, :2] = 3          # a repeated row inside one example and across examples
    ids[2, 1] = 3
    return ids


def _labels(seed=0):
    return np.random.default_rng(seed + 100).integers(0, C, B)


def _xent(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)   # (B,)


def _classifier(name="tok", **emb_kwargs):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(V, D, name=name, **emb_kwargs),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(C, name="head"),
    ], name="clf")


def _snapshot(model):
    layers = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    return [(layer, sorted(layer.__dict__), layer.trainable,
             [(v.trainable, np.array(v.numpy())) for v in layer.weights]) for layer in layers]


def _assert_unchanged(model, snap):
    for layer, keys, trainable, weights in snap:
        assert sorted(layer.__dict__) == keys, (layer.name, set(layer.__dict__) ^ set(keys))
        assert "call" not in layer.__dict__
        assert layer.trainable == trainable
        assert [v.trainable for v in layer.weights] == [t for t, _ in weights]
        for v, (_, w) in zip(layer.weights, weights):
            np.testing.assert_array_equal(v.numpy(), w)


def _tape_grads(model, loss_fn, variables):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]


def test_sequential_weight_grad_and_sources_match_tape():
    model = _classifier()
    ids, y = _ids(), _labels()
    snap = _snapshot(model)
    emb = model.get_layer("tok")
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    grads = cap.gradients(loss, sources=model.trainable_variables)
    _assert_unchanged(model, snap)
    g = grads.only()
    assert g is grads["tok"] and g.name == "tok" and (g.num_rows, g.dim) == (V, D) and not g.tied
    assert tuple(g.ids.shape) == (B, T) and tuple(g.output_grad.shape) == (B, T, D)
    ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model(ids))), model.trainable_variables)
    rg = g.weight_grad
    assert rg.rows.dtype == tf.int64 and rg.values.dtype == tf.float32
    np.testing.assert_array_equal(rg.rows.numpy(), np.unique(ids))
    np.testing.assert_allclose(rg.to_dense().numpy(), ref[0], atol=1e-6)
    # the ordinary gradients come from the same tape: one forward, one backward per step
    assert len(grads.sources) == len(ref)
    for s, r in zip(grads.sources, ref):
        np.testing.assert_allclose(tf.convert_to_tensor(s).numpy(), r, atol=1e-6)
    assert isinstance(grads.sources[0], tf.IndexedSlices)          # TF's own sparse gradient
    np.testing.assert_allclose(embgrad.row_grad(grads.sources[0]).to_dense().numpy(), ref[0], atol=1e-6)
    # a training step with those gradients
    before = emb.embeddings.numpy()
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads.sources, model.trainable_variables))
    np.testing.assert_allclose(emb.embeddings.numpy(), before - 0.1 * ref[0], atol=1e-6)


def test_per_example_matches_a_loop_sum_and_mean():
    model = _classifier()
    ids, y = _ids(), _labels()
    for reduction, reduce in (("sum", tf.reduce_sum), ("mean", tf.reduce_mean)):
        with embgrad.capture(model, layers="tok") as cap:
            loss = reduce(_xent(y, model(ids)))
        eg = cap.gradients(loss, loss_reduction=reduction)["tok"].per_example()
        assert eg.batch_size == B
        dense = eg.to_dense().numpy()
        emb = model.get_layer("tok").embeddings
        for b in range(B):
            ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y[b:b + 1], model(ids[b:b + 1]))), [emb])[0]
            np.testing.assert_allclose(dense[b], ref, atol=1e-6)
            assert set(eg.example(b).numpy()[0].tolist()) == set(ids[b].tolist())


def test_functional_several_inputs_merged_with_dense_features():
    keras.utils.set_random_seed(1)
    tokens = keras.Input((T,), dtype="int32", name="tokens")
    user = keras.Input((1,), dtype="int32", name="user")
    feats = keras.Input((2,), name="feats")
    t = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="token_emb")(tokens))
    u = keras.layers.Flatten()(keras.layers.Embedding(7, 3, name="user_emb")(user))
    x = keras.layers.Concatenate()([t, u, feats])                 # embedding + other features
    model = keras.Model([tokens, user, feats], keras.layers.Dense(C)(x))
    ids, y = _ids(), _labels()
    users = np.array([[0], [6], [0], [2], [3]])
    f = np.random.default_rng(0).normal(size=(B, 2)).astype("float32")
    snap = _snapshot(model)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model([ids, users, f])))
    grads = cap.gradients(loss)
    _assert_unchanged(model, snap)
    assert set(grads) == {"token_emb", "user_emb"}
    with pytest.raises(EmbgradError, match="only.. needs exactly one"):
        grads.only()
    tables = [model.get_layer("token_emb").embeddings, model.get_layer("user_emb").embeddings]
    ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model([ids, users, f]))), tables)
    np.testing.assert_allclose(grads["token_emb"].weight_grad.to_dense().numpy(), ref[0], atol=1e-6)
    np.testing.assert_allclose(grads["user_emb"].weight_grad.to_dense().numpy(), ref[1], atol=1e-6)
    np.testing.assert_array_equal(grads["user_emb"].weight_grad.rows.numpy(), [0, 2, 3, 6])
    assert tuple(grads["user_emb"].per_example().norms().shape) == (B,)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.words = keras.layers.Embedding(V, D, name="words")
        self.head = keras.layers.Dense(C)

    def call(self, ids):
        return self.head(tf.reduce_mean(self.words(ids), 1))


def test_subclassed_and_nested_models_by_name_and_path():
    keras.utils.set_random_seed(2)
    inner = _Subclassed()
    ids, y = _ids(), _labels()
    outer = keras.Sequential([keras.Input((T,), dtype="int32"), inner, keras.layers.Dense(C)], name="outer")
    for model in (inner, outer):
        with embgrad.capture(model, layers=["sub/words"] if model is outer else "words") as cap:
            loss = tf.reduce_sum(_xent(y, model(ids)))
        g = cap.gradients(loss)["words"]
        ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model(ids))), [inner.words.embeddings])[0]
        np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref, atol=1e-6)
    # a layer object works too, and a name that does not exist gets the closest names
    with embgrad.capture(outer, layers=inner.words) as cap:
        outer(ids)
    assert [i.name for i in cap.layers] == ["words"]
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'wrods'.*'words'"):
        embgrad.capture(outer, layers="wrods")
    with pytest.raises(EmbgradError, match="no embedding layer"):
        embgrad.capture(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


@pytest.mark.filterwarnings("ignore:Layer .lambda.:UserWarning")
def test_mask_zero_row_zero_reported_as_keras_computes_it_and_ignore_index():
    keras.utils.set_random_seed(3)
    # a pooling that ignores the mask: Keras still sends gradient to the padding row 0
    model = keras.Sequential([keras.Input((T,), dtype="int32"),
                              keras.layers.Embedding(V, D, mask_zero=True, name="tok"),
                              keras.layers.Lambda(lambda x: tf.reduce_sum(x, 1)),
                              keras.layers.Dense(C)])
    ids, y = _ids(), _labels()
    ids[:, -2:] = 0
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    g = cap.gradients(loss)["tok"]
    assert (g.info.pad_id, g.info.pad_masked, g.info.pad_receives_grad, g.info.padding) == (0, True, True, "mask_zero")
    ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model(ids))), [model.get_layer("tok").embeddings])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref, atol=1e-6)
    assert 0 in g.weight_grad.rows.numpy().tolist() and np.abs(ref[0]).sum() > 0
    dropped = embgrad.rows_from_lookups(g.ids, g.output_grad, V, ignore_index=0)
    assert 0 not in dropped.rows.numpy().tolist()
    np.testing.assert_allclose(dropped.to_dense().numpy()[1:], ref[1:], atol=1e-6)


def test_lora_enabled_embedding():
    model = _classifier()
    emb = model.get_layer("tok")
    emb.enable_lora(2)
    emb.lora_embeddings_b.assign(np.random.default_rng(0).normal(size=(2, D)).astype("float32"))
    ids, y = _ids(), _labels()
    snap = _snapshot(model)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    g = cap.gradients(loss, sources=model.trainable_variables)["tok"]
    _assert_unchanged(model, snap)
    assert g.info.low_rank is not None and g.info.low_rank.rank == 2 and not g.frozen
    d_a, d_b = lora_gradients(g)
    ref_a, ref_b = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model(ids))),
                               [emb.lora_embeddings_a, emb.lora_embeddings_b])
    np.testing.assert_allclose(d_a.to_dense().numpy(), ref_a, atol=1e-5)
    np.testing.assert_allclose(d_b.numpy(), ref_b, atol=1e-5)
    np.testing.assert_array_equal(d_a.rows.numpy(), np.unique(ids))
    with pytest.raises(EmbgradError, match="no LoRA"):
        with embgrad.capture(_classifier()) as cap2:
            loss = tf.reduce_sum(cap2.model(ids))
        lora_gradients(cap2.gradients(loss).only())


def test_embeddings_constraint_and_frozen_layer():
    model = _classifier(embeddings_constraint=keras.constraints.UnitNorm())
    ids, y = _ids(), _labels()
    model.get_layer("head").trainable = True
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    g = cap.gradients(loss)["tok"]
    ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model(ids))), [model.get_layer("tok").embeddings])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref, atol=1e-6)
    # a frozen table still gets its lookup gradient (the output is watched, not the variable)
    model.get_layer("tok").trainable = False
    snap = _snapshot(model)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    g2 = cap.gradients(loss, sources=model.trainable_variables)["tok"]
    _assert_unchanged(model, snap)
    assert g2.frozen and len(cap.gradients(loss, sources=model.trainable_variables).sources) == 2
    np.testing.assert_allclose(g2.weight_grad.to_dense().numpy(), ref, atol=1e-6)


def test_reversible_embedding_tied_whole_table_and_lookup_part():
    keras.utils.set_random_seed(4)
    emb = keras.layers.ReversibleEmbedding(V, D, tie_weights=True, name="tied")
    ids = _ids()
    targets = np.random.default_rng(5).integers(0, V, (B, T))
    dense = keras.layers.Dense(D, name="mix")

    def loss_fn():
        h = dense(emb(ids))
        logits = emb(h, reverse=True)                     # the tied output projection
        return tf.reduce_sum(_xent(targets, logits)), h, logits

    with embgrad.capture(emb) as cap:
        loss, h, _ = loss_fn()
    g = cap.gradients(loss)["tied"]
    assert g.tied and len(g.calls) == 1                   # the reverse call is not a lookup ...
    assert len(g.projections) == 1                        # ... but the table's tied projection
    with tf.GradientTape(persistent=True) as tape:
        loss, h, logits = loss_fn()
    total = tf.convert_to_tensor(tape.gradient(loss, emb.embeddings)).numpy()
    dlogits = tape.gradient(loss, logits).numpy().reshape(-1, V)
    projection = dlogits.T @ h.numpy().reshape(-1, D)    # d loss / d table through h @ table^T
    np.testing.assert_allclose(g.lookup_grad.to_dense().numpy() + projection, total, atol=1e-5)
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), total, atol=1e-5)
    assert np.abs(projection).sum() > 0


def test_mixed_precision_float16_output_grads_coalesced_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _classifier()
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        opt.build(model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ids, y = _ids(), _labels()
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(tf.cast(_xent(y, model(ids)), "float32"))
        scaled = opt.scale_loss(loss)
    g = cap.gradients(loss)["tok"]
    assert g.output_grad.dtype == tf.float16 and g.weight_grad.values.dtype == tf.float32
    ref = _tape_grads(model, lambda: tf.reduce_sum(tf.cast(_xent(y, model(ids)), "float32")),
                      [model.get_layer("tok").embeddings])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref, rtol=1e-2, atol=1e-4)
    # a scaled loss: pass the optimizer's scale (or unscale the results by hand)
    scale = float(opt.dynamic_scale.numpy())
    assert scale > 1
    gs = cap.gradients(scaled, loss_scale=opt.dynamic_scale, sources=model.trainable_variables)
    np.testing.assert_allclose(gs["tok"].weight_grad.to_dense().numpy(), ref, rtol=1e-2, atol=1e-4)
    assert gs["tok"].output_grad.dtype == tf.float32                 # unscaled in float32
    np.testing.assert_allclose(tf.convert_to_tensor(gs.sources[0]).numpy() / scale, ref, rtol=1e-2, atol=1e-4)
    raw = cap.gradients(scaled)["tok"].weight_grad
    np.testing.assert_allclose(raw.scale(1.0 / scale).to_dense().numpy(), ref, rtol=1e-2, atol=1e-4)
    with pytest.raises(EmbgradError, match="loss_scale must be a positive"):
        cap.gradients(scaled, loss_scale=0.0)
    with embgrad.capture(model) as cap:                # a scale too large for float16: overflow
        loss = tf.reduce_sum(tf.cast(_xent(y, model(ids)), "float32"))
        scaled = loss * 1e30
    with pytest.raises(EmbgradError, match="scaled loss overflowed: skip this step"):
        cap.gradients(scaled, loss_scale=1e30)


def test_capture_inside_tf_function_matches_eager():
    model = _classifier()
    ids, y = _ids(), _labels()

    @tf.function
    def step(ids, y):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(_xent(y, model(ids)))
        g = cap.gradients(loss, sources=model.trainable_variables)
        return g["tok"].weight_grad.rows, g["tok"].weight_grad.values, g["tok"].per_example().norms()

    rows, values, norms = step(tf.constant(ids), tf.constant(y))
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids)))
    g = cap.gradients(loss)["tok"]
    np.testing.assert_array_equal(rows.numpy(), g.weight_grad.rows.numpy())
    np.testing.assert_allclose(values.numpy(), g.weight_grad.values.numpy(), atol=1e-6)
    np.testing.assert_allclose(norms.numpy(), g.per_example().norms().numpy(), rtol=1e-5)
    assert "call" not in model.get_layer("tok").__dict__
    bad = ids.copy()
    bad[1, 2] = V                              # values are unknown while tracing: a run-time check
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"out of range for a table of {V} rows"):
        step(tf.constant(bad), tf.constant(y))


def test_dp_sgd_train_step_compiled_by_model_fit():
    """The capture inside a custom ``train_step``, traced by ``model.fit`` with a batch size of
    None: per-example norms, clip and the clipped sum in graph mode, applied as the table's
    update, equal the same computed eagerly; the closure-captured clip bound works too."""
    clip = 0.05

    class DPClassifier(keras.Model):
        def train_step(self, data):
            x, y = data
            with embgrad.capture(self, layers="tok") as cap:
                loss = tf.reduce_sum(_xent(y, self(x, training=True)))
            g = cap.gradients(loss, sources=self.trainable_variables)
            pe = g["tok"].per_example()
            summed = pe.clip(clip).sum()
            table = self.get_layer("tok").embeddings
            grads = [tf.IndexedSlices(summed.values, summed.rows, tf.shape(table, out_type=tf.int64))
                     if v is table else s for v, s in zip(self.trainable_variables, g.sources)]
            self.optimizer.apply(grads, self.trainable_variables)
            return {"max_norm": tf.reduce_max(pe.norms()), "clipped_max": tf.reduce_max(pe.clip(clip).norms())}

    keras.utils.set_random_seed(0)
    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(V, D, name="tok")(inp)
    model = DPClassifier(inp, keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(keras.optimizers.SGD(1.0))
    ids, y = _ids(), _labels()
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model(ids, training=True)))
    pe = cap.gradients(loss).only().per_example()
    want = pe.clip(clip).sum().to_dense().numpy()
    before = model.get_layer("tok").embeddings.numpy()
    hist = model.fit(ids, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(hist.history["max_norm"][0], float(tf.reduce_max(pe.norms())), rtol=1e-5)
    assert hist.history["clipped_max"][0] <= clip * (1 + 1e-5)
    np.testing.assert_allclose(model.get_layer("tok").embeddings.numpy(), before - want, atol=1e-6)
    assert "call" not in model.get_layer("tok").__dict__


def test_traced_with_unknown_batch_size_what_works_and_what_says_why():
    model = _classifier()
    spec = (tf.TensorSpec((None, T), tf.int32), tf.TensorSpec((None,), tf.int32))

    def grads(ids, y, reduction="sum"):
        with embgrad.capture(model) as cap:
            xent = _xent(y, model(ids))
            loss = tf.reduce_sum(xent) if reduction == "sum" else tf.reduce_mean(xent)
        return cap.gradients(loss, loss_reduction=reduction)["tok"]

    @tf.function(input_signature=spec)
    def mean_step(ids, y):
        pe = grads(ids, y, "mean").per_example()
        return pe.norms(), pe.scale(2.0).sum().values

    ids, y = _ids(), _labels()
    norms, values = mean_step(ids, y)
    pe = grads(ids, y, "mean").per_example()        # eager, "mean": each example's own loss
    np.testing.assert_allclose(norms.numpy(), pe.norms().numpy(), rtol=1e-5)
    np.testing.assert_allclose(values.numpy(), pe.sum().values.numpy() * 2, rtol=1e-5, atol=1e-7)
    norms3, _ = mean_step(ids[:3], y[:3])            # another batch size: the same trace
    assert norms3.shape == (3,) and mean_step.experimental_get_tracing_count() == 1

    for what in ("len()", "to_dense()"):   # dot() and example() work traced (test_tf_compiled.py)
        @tf.function(input_signature=spec)
        def needs_batch(ids, y, what=what):
            pe = grads(ids, y).per_example()
            return {"len()": lambda: len(pe), "dot()": pe.dot, "to_dense()": pe.to_dense,
                    "example()": lambda: pe.example(0).values}[what]()

        with pytest.raises(EmbgradError, match=f"ExampleGrads.{what.replace('(', '[(]').replace(')', '[)]')} "
                                               "needs the batch size"):
            needs_batch(ids, y)

    shared = model.get_layer("tok")

    def two_calls(forwards):                  # one layer, two batches of sizes unknown when traced
        @tf.function(input_signature=spec * 2)
        def step(ids, y, ids2, y2):
            with embgrad.capture(model, forwards=forwards) as cap:
                loss = tf.reduce_sum(_xent(y, model(ids))) + tf.reduce_sum(shared(ids2))
            return cap.gradients(loss)["tok"].per_example().norms()
        return step

    # the layer called outside the model's forward: a forward of its own, distinct examples
    assert two_calls("distinct")(ids, y, ids[:2], y[:2]).shape == (B + 2,)
    assert two_calls("same_examples")(ids, y, ids, y).shape == (B,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same_examples.*different batch sizes"):
        two_calls("same_examples")(ids, y, ids[:2], y[:2])

    @tf.function(input_signature=spec)
    def nan_step(ids, y):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(_xent(y, model(ids))) * np.float32(np.nan)
        return cap.gradients(loss)["tok"].weight_grad.values

    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN/Inf"):
        nan_step(ids, y)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (np.array([[1, 2, V]]), f"id {V} at position \\(0, 2\\) is out of range for a table of {V} rows"),
    (np.array([[1, -1, 2]]), "id -1 .* out of range"),              # Keras would wrap it
    (np.array([[1.5, 2.0, 3.0]], dtype="float32"), "dtype float32"),
])
def test_bad_ids_refused_before_keras_and_model_left_clean(bad, match):
    emb = keras.layers.Embedding(V, D, name="tok")
    emb.build()
    snap = _snapshot(emb)
    with pytest.raises(EmbgradError, match=match):
        with embgrad.capture(emb):
            emb(tf.constant(bad))
    _assert_unchanged(emb, snap)


def test_forward_raising_mid_call_leaves_model_clean():
    model = _classifier()
    snap = _snapshot(model)

    class Boom(Exception):
        pass

    def explode(x):
        raise Boom

    with pytest.raises(Boom):
        with embgrad.capture(model):
            h = model.get_layer("tok")(_ids())
            explode(h)
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError):          # Keras's own error mid-forward (wrong rank)
        with embgrad.capture(model):
            model(np.ones((2, 3, 4, 5), dtype="int32"))
    _assert_unchanged(model, snap)


def test_forward_or_loss_outside_the_block_and_nan():
    model = _classifier()
    ids, y = _ids(), _labels()
    with embgrad.capture(model) as cap:
        pass
    model(ids)
    with pytest.raises(EmbgradError, match="no lookup of the captured layers"):
        cap.gradients(tf.constant(1.0))
    with embgrad.capture(model) as cap:
        logits = model(ids)
    loss = tf.reduce_sum(_xent(y, logits))          # computed after the tape stopped
    with pytest.raises(EmbgradError, match="compute the loss INSIDE"):
        cap.gradients(loss)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(model(ids)) * np.float32(np.nan)
    with pytest.raises(EmbgradError, match="NaN/Inf"):
        cap.gradients(loss)
    with embgrad.capture(model) as cap:
        out = model(ids)
    with pytest.raises(EmbgradError, match="scalar"):
        cap.gradients(out)
    with pytest.raises(EmbgradError, match="RaggedTensor"):
        with embgrad.capture(model.get_layer("tok")):
            model.get_layer("tok")(tf.ragged.constant([[1, 2], [3]]))


def test_model_fit_inside_capture_is_refused_clearly():
    model = _classifier()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    snap = _snapshot(model)[1:]       # fit itself adds attributes (history, ...) to the model
    with pytest.raises(EmbgradError, match="traced inside the capture"):
        with embgrad.capture(model):
            model.fit(_ids(), _labels(), epochs=1, verbose=0)
    _assert_unchanged(model, snap)
    # once fit's step is traced, it no longer calls the layer from Python: nothing is recorded
    model.fit(_ids(), _labels(), epochs=1, verbose=0)
    with embgrad.capture(model) as cap:
        model.fit(_ids(), _labels(), epochs=1, verbose=0)
    with pytest.raises(EmbgradError, match="no lookup of the captured layers"):
        cap.gradients(tf.constant(1.0))


def test_one_embedding_shared_by_two_inputs():
    keras.utils.set_random_seed(6)
    a, b = keras.Input((T,), dtype="int32"), keras.Input((T,), dtype="int32")
    shared = keras.layers.Embedding(V, D, name="shared")
    pool = keras.layers.GlobalAveragePooling1D()
    diff = keras.layers.Subtract()([pool(shared(a)), pool(shared(b))])
    model = keras.Model([a, b], keras.layers.Dense(C)(diff))
    ids_a, ids_b, y = _ids(0), _ids(1), _labels()
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(_xent(y, model([ids_a, ids_b])))
    g = cap.gradients(loss)["shared"]
    assert len(g.calls) == 2 and g.ids is g.calls[0][0]
    ref = _tape_grads(model, lambda: tf.reduce_sum(_xent(y, model([ids_a, ids_b]))), [shared.embeddings])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref, atol=1e-6)
    eg = g.per_example()                     # both calls look up the same B examples
    np.testing.assert_allclose(eg.sum().to_dense().numpy(), ref, atol=1e-6)
    for i in range(B):
        one = _tape_grads(model, lambda: tf.reduce_sum(_xent(y[i:i + 1], model([ids_a[i:i + 1], ids_b[i:i + 1]]))),
                          [shared.embeddings])[0]
        np.testing.assert_allclose(eg.to_dense().numpy()[i], one, atol=1e-6)
