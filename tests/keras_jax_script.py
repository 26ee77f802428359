"""Run with KERAS_BACKEND=jax (by tests/test_keras_jax.py): Keras 3 on JAX through
embgrad.value_and_gradients, checked against jax.grad / jax.vmap of model.stateless_call."""
from __future__ import annotations

import os

assert os.environ.get("KERAS_BACKEND") == "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402

assert keras.backend.backend() == "jax"
V, D, B, T = 31, 6, 5, 7
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((T,), dtype="int32"), keras.layers.Embedding(V, D, name="tok"),
                          keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
r = np.random.default_rng(0)
x = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
y = jnp.asarray(r.integers(0, 3, B), jnp.int32)


def xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).sum()


def loss_fn(m, x, y):
    return xent(m(x), y)


tv = [v.value for v in model.trainable_variables]
ntv = [v.value for v in model.non_trainable_variables]
k = next(i for i, v in enumerate(model.trainable_variables) if v.path.endswith("tok/embeddings"))


def stateless(tv, x, y):
    return xent(model.stateless_call(tv, ntv, x)[0], y)


before = [np.asarray(v) for v in tv]
loss, grads = embgrad.value_and_gradients(loss_fn, model, x, y)
g = grads["tok"]
assert all(np.array_equal(a, np.asarray(v.value)) for a, v in zip(before, model.trainable_variables, strict=True))
dense = np.asarray(jax.grad(stateless)(tv, x, y)[k])
np.testing.assert_allclose(np.asarray(g.weight_grad.to_dense()), dense, atol=1e-6)
np.testing.assert_array_equal(np.asarray(g.weight_grad.rows), np.unique(np.asarray(x)))
per = jax.vmap(lambda x1, y1: jax.grad(stateless)(tv, x1[None], y1[None])[k])(x, y)   # (B, V, D)
ref = np.linalg.norm(np.asarray(per).reshape(B, -1), axis=1)
np.testing.assert_allclose(np.asarray(g.per_example().norms()), ref, rtol=1e-5)


@jax.jit
def step(tv, x, y):
    # inside jit through the user's own stateless_call: the tap sees the Embedding's call there too
    _, grads = embgrad.value_and_gradients(lambda m, x, y: xent(m.stateless_call(tv, ntv, x)[0], y),
                                           model, x, y)
    pe = grads["tok"].per_example()
    return pe.norms(), pe.clip(0.1).sum().to_dense()


norms, clipped = step(tv, x, y)
np.testing.assert_allclose(np.asarray(norms), ref, rtol=1e-5)
f = np.minimum(1.0, 0.1 / ref)
np.testing.assert_allclose(np.asarray(clipped), (np.asarray(per) * f[:, None, None]).sum(0), atol=1e-6)

try:
    embgrad.value_and_gradients(loss_fn, model, x.at[0, 0].set(V), y)
    raise AssertionError("no error for an out-of-range id")
except EmbgradError as e:
    assert "'tok'" in str(e) and f"id {V} is out of range" in str(e), e
try:
    with embgrad.capture(model):
        pass
    raise AssertionError("capture on Keras-JAX did not refuse")
except EmbgradError as e:
    assert "value_and_gradients" in str(e), e
for fn in (embgrad.attribute, embgrad.hotflip):
    try:
        fn(model, x, target=1)
        raise AssertionError(f"{fn.__name__} on Keras-JAX did not refuse")
    except EmbgradError as e:
        assert str(e).startswith(f"embgrad.{fn.__name__} is not available for JAX"), e
print("KERAS-JAX OK")

# a table read outside the Embedding layer (a tied projection written by hand) is seen, not missed
emb = model.get_layer("tok")


def hand_tied(m, x, y):
    h = m.layers[0](x)                                   # (B, T, D) lookups
    logits = h.mean(1) @ emb.embeddings.value.T           # (B, V): reads the table directly
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).sum()


_, grads = embgrad.value_and_gradients(hand_tied, model, x, y)
assert grads["tok"].tied
try:
    _ = grads["tok"].weight_grad
    raise AssertionError("a hand-written read of the table was not refused")
except EmbgradError as e:
    assert "reads the layer's embeddings variable directly" in str(e), e
_, grads = embgrad.value_and_gradients(loss_fn, model, x, y)
assert not grads["tok"].tied                              # no false alarm on the plain model
print("KERAS-JAX TIED OK")

# position ids (T,) broadcast over the batch with T == B: refused, not taken as per-example;
# with the batch dimension they are exact against jax.vmap(jax.grad(stateless_call))
P = 5


class PosAdd(keras.layers.Layer):
    def __init__(self, batched, **kw):
        super().__init__(**kw)
        self.batched = batched
        self.pos = keras.layers.Embedding(P, D, name="pos")

    def call(self, h):
        t = keras.ops.arange(keras.ops.shape(h)[1])
        if self.batched:
            t = keras.ops.broadcast_to(t, keras.ops.shape(h)[:2])
        return h + self.pos(t)


xp, yp = x[:P, :P], y[:P]


def check_positions(batched):
    keras.utils.set_random_seed(0)
    inp = keras.Input((P,), dtype="int32")
    h = PosAdd(batched, name="posadd")(keras.layers.Embedding(V, D, name="tok")(inp))
    pm = keras.Model(inp, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(keras.ops.tanh(h))))
    _, grads = embgrad.value_and_gradients(loss_fn, pm, xp, yp)
    ptv = [v.value for v in pm.trainable_variables]
    pntv = [v.value for v in pm.non_trainable_variables]
    kp = next(i for i, v in enumerate(pm.trainable_variables) if v.path.endswith("pos/embeddings"))

    def pstateless(tv, x, y):
        return xent(pm.stateless_call(tv, pntv, x)[0], y)

    per = jax.vmap(lambda x1, y1: jax.grad(pstateless)(ptv, x1[None], y1[None])[kp])(xp, yp)
    np.testing.assert_allclose(np.asarray(grads["pos"].weight_grad.to_dense()), np.asarray(per).sum(0), atol=1e-6)
    if batched:
        np.testing.assert_allclose(np.asarray(grads["pos"].per_example().to_dense()), np.asarray(per), atol=1e-6)
    else:
        try:
            grads["pos"].per_example()
            raise AssertionError("(T,) position ids with T == B were taken as per-example")
        except EmbgradError as e:
            assert "'pos'" in str(e) and "broadcasts over the batch" in str(e), e


check_positions(False)
check_positions(True)
print("KERAS-JAX POSITIONS OK")
