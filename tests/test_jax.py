"""JAX / Flax NNX: embgrad.value_and_gradients against jax.grad (dense table gradient) and
jax.vmap(jax.grad(...)) (per-example gradients), eagerly and under jax.jit / nnx.jit."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402

V, D, C = 23, 6, 3


class Classifier(nnx.Module):
    """Mean-pooled embeddings -> linear; ``pad`` positions are masked out of the pooling."""

    def __init__(self, V=V, D=D, C=C, seed=0, dtype=None):
        rngs = nnx.Rngs(seed)
        self.emb = nnx.Embed(V, D, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, x, pad=None):
        h = jnp.tanh(self.emb(x)).astype(jnp.float32)
        mask = jnp.ones(x.shape, h.dtype) if pad is None else (x != pad).astype(h.dtype)
        return self.out((h * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0))


class TwoCalls(nnx.Module):
    """One table looked up twice per example (a query and a document)."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.out = nnx.Linear(2 * D, C, rngs=rngs)

    def __call__(self, q, d):
        return self.out(jnp.concatenate([jnp.tanh(self.emb(q)).sum(1), self.emb(d).max(1)], -1))


class TiedLM(nnx.Module):
    """A tiny language model whose output projection is the embedding (``Embed.attend``)."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.tok = nnx.Embed(V, D, rngs=rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.tok.attend(jnp.tanh(self.mix(self.tok(x))))


class HandTied(TiedLM):
    def __call__(self, x):   # reads the table directly: embgrad cannot see this use
        return jnp.tanh(self.mix(self.tok(x))) @ self.tok.embedding[...].T


def xent(m, x, y, reduction="sum"):
    lp = jax.nn.log_softmax(m(x))
    per = -jnp.take_along_axis(lp, y[:, None], axis=1)[:, 0]
    return per.sum() if reduction == "sum" else per.mean()


def lm_loss(m, x):
    lp = jax.nn.log_softmax(m(x[:, :-1]))
    return -jnp.take_along_axis(lp, x[:, 1:, None], axis=2).sum()


def data(B=5, T=7, seed=1):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.integers(0, V, (B, T)), jnp.int32), jnp.asarray(r.integers(0, C, (B,)), jnp.int32)


def dense_table_grad(loss_fn, model, *args, path=("emb", "embedding")):
    g = nnx.jit(nnx.grad(loss_fn))(model, *args)         # compiled once: faster than op by op
    for p in path:
        g = g[p]
    return np.asarray(g[...])


def per_example_reference(loss_fn, model, *args, path=("emb", "embedding")):
    """(B, V, D) per-example table gradients by jax.vmap(jax.grad(...)) over single examples."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(params, *ex):
        return loss_fn(nnx.merge(graphdef, params, rest), *[a[None] for a in ex])

    g = jax.jit(jax.vmap(jax.grad(one), in_axes=(None,) + (0,) * len(args)))(params, *args)
    for p in path:
        g = g[p]
    return np.asarray(g[...])


def params_of(model):
    def host(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf)
    return jax.tree_util.tree_map(host, nnx.state(model))


def assert_same_state(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------- core results
def test_weight_grad_and_per_example_match_jax_grad_and_vmap_eagerly():
    m = Classifier()
    x, y = data()
    before = params_of(m)
    loss, grads = embgrad.value_and_gradients(xent, m, x, y)
    assert_same_state(before, params_of(m))            # the model is untouched
    np.testing.assert_allclose(float(loss), float(xent(m, x, y)), rtol=1e-6)
    g = grads["emb"]
    assert g is grads.only() and g.num_rows == V and g.dim == D and not g.tied
    assert g.ids.shape == (5, 7) and g.output_grad.shape == (5, 7, D)
    rg = g.weight_grad
    assert isinstance(rg, embgrad.RowGrad) and isinstance(rg.values, jax.Array)
    np.testing.assert_array_equal(np.asarray(rg.rows), np.unique(np.asarray(x)))
    dense = dense_table_grad(xent, m, x, y)
    np.testing.assert_allclose(np.asarray(rg.to_dense()), dense, atol=1e-6)
    ref = per_example_reference(xent, m, x, y)
    pe = g.per_example()
    assert isinstance(pe, embgrad.ExampleGrads) and pe.batch_size == 5
    np.testing.assert_allclose(np.asarray(pe.norms()), np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pe.to_dense()), ref, atol=1e-6)
    clipped = pe.clip(0.05).sum()
    factors = np.minimum(1.0, 0.05 / np.linalg.norm(ref.reshape(5, -1), axis=1))
    np.testing.assert_allclose(np.asarray(clipped.to_dense()), (ref * factors[:, None, None]).sum(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(pe.example(2).to_dense()), ref[2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(pe.dot()), ref.reshape(5, -1) @ ref.reshape(5, -1).T, atol=1e-6)
    assert "backend=jax" in repr(g) and "RowGrad(rows=" in repr(rg)


def test_under_jit_results_are_static_shaped_and_match():
    m = Classifier()
    x, y = data()
    graphdef, state = nnx.split(m)

    @jax.jit
    def step(state, x, y):
        model = nnx.merge(graphdef, state)
        loss, grads = embgrad.value_and_gradients(xent, model, x, y)
        g = grads["emb"]
        pe = g.per_example()
        assert pe.rows.shape == (35,)            # B*T slots: padded, static
        return loss, pe.norms(), pe.clip(0.05).sum(), g.weight_grad, g.weight_grad.norm(), grads

    loss, norms, clipped, wg, wnorm, grads = step(state, x, y)
    ref = per_example_reference(xent, m, x, y)
    ref_norms = np.linalg.norm(ref.reshape(5, -1), axis=1)
    np.testing.assert_allclose(np.asarray(norms), ref_norms, rtol=1e-5)
    factors = np.minimum(1.0, 0.05 / ref_norms)
    np.testing.assert_allclose(np.asarray(clipped.to_dense()), (ref * factors[:, None, None]).sum(0), atol=1e-6)
    # padded slots: ids >= V, zero values, ascending and distinct
    rows = np.asarray(wg.rows)
    n = len(np.unique(np.asarray(x)))
    assert rows.shape == (35,) and np.all(np.diff(rows) > 0) and np.all(rows[n:] >= V)
    assert np.all(np.asarray(wg.values)[n:] == 0)
    np.testing.assert_allclose(np.asarray(wg.to_dense()), dense_table_grad(xent, m, x, y), atol=1e-6)
    np.testing.assert_allclose(float(wnorm), np.linalg.norm(ref.sum(0)), rtol=1e-5)
    # the Gradients returned by the jitted function (a pytree) work eagerly, trimmed
    np.testing.assert_array_equal(np.asarray(grads["emb"].weight_grad.rows), np.unique(np.asarray(x)))


def test_inside_nnx_jit_and_mean_reduction():
    m = Classifier()
    x, y = data()

    @nnx.jit
    def step(model, x, y):
        loss, grads = embgrad.value_and_gradients(lambda mm, a, b: xent(mm, a, b, "mean"), model, x, y,
                                                  loss_reduction="mean")
        return loss, grads["emb"].per_example().norms(), grads["emb"].weight_grad.to_dense()

    loss, norms, wg = step(m, x, y)
    ref = per_example_reference(xent, m, x, y)     # per-example terms of the summed loss
    np.testing.assert_allclose(np.asarray(norms), np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(wg), ref.sum(0) / 5, atol=1e-6)


def test_padding_masked_by_the_loss_gives_the_pad_row_zero_as_jax_grad_does():
    m = Classifier()
    x, y = data()
    x = x.at[:, 5:].set(0).at[0, 1:].set(0)            # id 0 pads

    def loss(mm, x, y):
        lp = jax.nn.log_softmax(mm(x, pad=0))
        return -jnp.take_along_axis(lp, y[:, None], 1).sum()

    _, grads = embgrad.value_and_gradients(loss, m, x, y)
    rg = grads["emb"].weight_grad
    dense = dense_table_grad(loss, m, x, y)
    np.testing.assert_allclose(np.asarray(rg.to_dense()), dense, atol=1e-6)
    assert np.all(dense[0] == 0)
    ref = per_example_reference(loss, m, x, y)
    np.testing.assert_allclose(np.asarray(grads["emb"].per_example().norms()),
                               np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)


def test_layer_called_several_times():
    m = TwoCalls()
    q, y = data(T=4)
    d, _ = data(T=9, seed=2)

    def loss(mm, q, d, y):
        lp = jax.nn.log_softmax(mm(q, d))
        return -jnp.take_along_axis(lp, y[:, None], 1).sum()

    _, grads = embgrad.value_and_gradients(loss, m, q, d, y)
    g = grads["emb"]
    assert len(g.calls) == 2 and g.calls[1][0].shape == (5, 9) and "calls=2" in repr(g)
    np.testing.assert_allclose(np.asarray(g.weight_grad.to_dense()), dense_table_grad(loss, m, q, d, y), atol=1e-6)
    ref = per_example_reference(loss, m, q, d, y)
    np.testing.assert_allclose(np.asarray(g.per_example().to_dense()), ref, atol=1e-6)
    jitted = jax.jit(lambda st, q, d, y: embgrad.value_and_gradients(
        loss, nnx.merge(nnx.graphdef(m), st), q, d, y)[1]["emb"].per_example().norms())
    np.testing.assert_allclose(np.asarray(jitted(nnx.state(m), q, d, y)),
                               np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)


def test_tied_attend_whole_table_and_lookup_part():
    m = TiedLM()
    x, _ = data(T=6)
    _, grads = embgrad.value_and_gradients(lm_loss, m, x)
    g = grads["tok"]
    assert g.tied and len(g.projections) == 1
    path = ("tok", "embedding")
    dense = dense_table_grad(lm_loss, m, x, path=path)
    np.testing.assert_allclose(np.asarray(g.weight_grad.to_dense()), dense, atol=1e-5)
    ref = per_example_reference(lm_loss, m, x, path=path)
    np.testing.assert_allclose(np.asarray(g.per_example().norms()), np.linalg.norm(ref.reshape(5, -1), axis=1),
                               rtol=1e-5)
    # the lookup part alone: what the probes on the lookups give
    look = g.per_example(part="lookup")
    assert isinstance(look, embgrad.ExampleGrads)
    lookup_dense = np.asarray(look.sum().to_dense())
    np.testing.assert_allclose(lookup_dense, np.asarray(g.lookup_grad.to_dense()), atol=1e-6)
    assert np.abs(lookup_dense - dense).max() > 1e-3   # the projection part is not in it
    # under jit: the whole table's gradient works, its per-example form asks to be called eagerly
    wg = jax.jit(lambda st, x: embgrad.value_and_gradients(lm_loss, nnx.merge(nnx.graphdef(m), st), x)[1]
                 ["tok"].weight_grad.to_dense())(nnx.state(m), x)
    np.testing.assert_allclose(np.asarray(wg), dense, atol=1e-5)
    with pytest.raises(EmbgradError, match="eagerly"):
        jax.jit(lambda st, x: embgrad.value_and_gradients(lm_loss, nnx.merge(nnx.graphdef(m), st), x)[1]
                ["tok"].per_example().norms())(nnx.state(m), x)


def test_table_read_outside_lookups_is_refused_not_guessed():
    m = HandTied()
    x, _ = data(T=6)
    _, grads = embgrad.value_and_gradients(lm_loss, m, x)
    g = grads["tok"]
    assert g.tied
    for what in (lambda: g.weight_grad, lambda: g.per_example()):
        with pytest.raises(EmbgradError, match=r"'tok'.*attend\(h\)"):
            what()
    # the lookup part is still exact
    look = np.asarray(g.per_example(part="lookup").sum().to_dense())
    np.testing.assert_allclose(look, np.asarray(g.lookup_grad.to_dense()), atol=1e-6)


def test_mixed_precision_accumulates_in_float32():
    m = Classifier(dtype=jnp.bfloat16)
    x, y = data()
    _, grads = embgrad.value_and_gradients(xent, m, x, y)
    g = grads["emb"]
    assert g.output_grad.dtype == jnp.bfloat16
    assert g.weight_grad.values.dtype == jnp.float32 and g.per_example().values.dtype == jnp.float32
    dense = dense_table_grad(xent, m, x, y)
    np.testing.assert_allclose(np.asarray(g.weight_grad.to_dense()), dense, atol=2e-2, rtol=2e-2)


def test_sources_give_the_other_parameters_dense_as_nnx_grad():
    m = Classifier()
    x, y = data()
    _, grads = embgrad.value_and_gradients(xent, m, x, y, sources=nnx.Param)
    ref = nnx.grad(xent)(m, x, y)
    np.testing.assert_allclose(np.asarray(grads.sources["out"]["kernel"][...]),
                               np.asarray(ref["out"]["kernel"][...]), atol=1e-6)
    assert "emb" not in grads.sources            # the table's gradient is the sparse weight_grad


def test_forward_state_updates_propagate_like_nnx_value_and_grad():
    class Dropped(Classifier):
        def __init__(self):
            super().__init__()
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))

        def __call__(self, x, pad=None):
            return self.out(self.drop(jnp.tanh(self.emb(x))).mean(1))

    a, b = Dropped(), Dropped()
    x, y = data()
    l1, grads = embgrad.value_and_gradients(xent, a, x, y)
    l2, dense = nnx.value_and_grad(xent)(b, x, y)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)     # the same dropout mask
    np.testing.assert_allclose(np.asarray(grads["emb"].weight_grad.to_dense()),
                               np.asarray(dense["emb"]["embedding"][...]), atol=1e-6)
    assert_same_state(params_of(a), params_of(b))                   # rng counters advanced alike


# ---------------------------------------------------------------------------- errors
def test_bad_ids_eagerly_name_the_layer_the_value_and_the_fix():
    m = Classifier()
    x, y = data()
    with pytest.raises(EmbgradError, match=r"layer 'emb': id 23 is out of range.*23 rows.*Fix: map the ids"):
        embgrad.value_and_gradients(xent, m, x.at[1, 2].set(V), y)
    with pytest.raises(EmbgradError, match=r"id -24 is out of range"):
        embgrad.value_and_gradients(xent, m, x.at[0, 0].set(-V - 1), y)
    with pytest.raises(EmbgradError, match="ids must be integers"):
        embgrad.value_and_gradients(lambda mm, a: mm.emb(a).sum(), m, x.astype(jnp.float32))


def test_negative_ids_wrap_as_nnx_embed_does():
    m = Classifier()
    x, y = data()
    xn = x.at[0, 0].set(-1)
    _, grads = embgrad.value_and_gradients(xent, m, xn, y)
    np.testing.assert_allclose(np.asarray(grads["emb"].weight_grad.to_dense()), dense_table_grad(xent, m, xn, y),
                               atol=1e-6)
    assert int(grads["emb"].ids[0, 0]) == V - 1


def test_bad_ids_under_jit_fail_at_run_time_with_the_message():
    m = Classifier()
    x, y = data()
    f = jax.jit(lambda st, x, y: embgrad.value_and_gradients(xent, nnx.merge(nnx.graphdef(m), st), x, y)[1]
                ["emb"].per_example().norms())
    f(nnx.state(m), x, y).block_until_ready()
    with pytest.raises(Exception, match=r"layer 'emb': id 23 is out of range"):
        f(nnx.state(m), x.at[1, 2].set(V), y).block_until_ready()


def test_bad_layer_name_model_loss_and_reduction():
    m = Classifier()
    x, y = data()
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'embb'.*closest names: 'emb'"):
        embgrad.value_and_gradients(xent, m, x, y, layers="embb")
    with pytest.raises(EmbgradError, match="scalar float loss"):
        embgrad.value_and_gradients(lambda mm, a: mm(a), m, x)
    with pytest.raises(EmbgradError, match="loss_reduction must be 'sum' or 'mean'"):
        embgrad.value_and_gradients(xent, m, x, y, loss_reduction="avg")
    with pytest.raises(EmbgradError, match="Flax NNX module"):
        embgrad.value_and_gradients(xent, object(), x, y)
    with pytest.raises(EmbgradError, match="not called by loss_fn"):
        embgrad.value_and_gradients(lambda mm, a: mm.out(jnp.ones((2, D))).sum(), m, x)


def test_per_example_refuses_lookups_without_the_batch_dimension():
    class Positions(Classifier):
        def __init__(self):
            super().__init__()
            self.pos = nnx.Embed(7, D, rngs=nnx.Rngs(5))

        def __call__(self, x, pad=None):
            h = self.emb(x) + self.pos(jnp.arange(x.shape[1]))
            return self.out(jnp.tanh(h).mean(1))

    m = Positions()
    x, y = data()
    _, grads = embgrad.value_and_gradients(xent, m, x, y)
    np.testing.assert_allclose(np.asarray(grads["pos"].weight_grad.to_dense()),
                               dense_table_grad(xent, m, x, y, path=("pos", "embedding")), atol=1e-6)
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*broadcast_to"):
        grads["pos"].per_example()
    ref = per_example_reference(xent, m, x, y)
    np.testing.assert_allclose(np.asarray(grads["emb"].per_example().to_dense()), ref, atol=1e-6)


class SquarePositions(Classifier):
    """Token + position embeddings; the position ids have no batch dimension (``expand``: (T,)
    added to (B, T, D); ``lead``: ``[None]`` first; ``batched``: ids broadcast to the batch)."""

    def __init__(self, how="expand"):
        super().__init__()
        self.pos = nnx.Embed(7, D, rngs=nnx.Rngs(5))
        self.how = how

    def __call__(self, x, pad=None):
        t = jnp.arange(x.shape[1])
        p = (self.pos(t) if self.how == "expand" else self.pos(t)[None] if self.how == "lead"
             else self.pos(jnp.broadcast_to(t, x.shape)))
        return self.out(jnp.tanh(self.emb(x) + p).mean(1))


@pytest.mark.parametrize("how", ["expand", "lead"])
def test_position_ids_as_long_as_the_batch_are_refused_not_taken_as_per_example(how):
    # T == B: the (T,) ids pass a shape check on their first dimension, but their output is
    # broadcast over the batch; taking row b as example b's would be silently wrong
    m = SquarePositions(how)
    x, y = data(B=5, T=5)
    _, grads = embgrad.value_and_gradients(xent, m, x, y)
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*\(5,\).*broadcasts over the batch.*broadcast_to"):
        grads["pos"].per_example()
    np.testing.assert_allclose(np.asarray(grads["pos"].weight_grad.to_dense()),
                               dense_table_grad(xent, m, x, y, path=("pos", "embedding")), atol=1e-6)
    ref = per_example_reference(xent, m, x, y)
    np.testing.assert_allclose(np.asarray(grads["emb"].per_example().to_dense()), ref, atol=1e-6)
    step = nnx.jit(lambda m, x, y: embgrad.value_and_gradients(xent, m, x, y)[1]["pos"].per_example())
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*broadcasts over the batch"):
        step(m, x, y)


def test_position_ids_with_the_batch_dimension_are_exact_when_t_equals_b():
    m = SquarePositions("batched")
    x, y = data(B=5, T=5)
    _, grads = embgrad.value_and_gradients(xent, m, x, y)
    ref = per_example_reference(xent, m, x, y, path=("pos", "embedding"))
    np.testing.assert_allclose(np.asarray(grads["pos"].per_example().to_dense()), ref, atol=1e-6)


def test_a_per_example_id_lookup_of_batch_length_stays_per_example():
    # a (B,) user-id lookup giving (B, D), combined with the (B, T, D) tokens per example: legitimate
    class WithUser(Classifier):
        def __init__(self):
            super().__init__()
            self.user = nnx.Embed(11, D, rngs=nnx.Rngs(7))

        def __call__(self, x, u):
            return self.out(jnp.tanh(self.emb(x) + self.user(u)[:, None, :]).mean(1))

    def loss(m, x, u, y):
        lp = jax.nn.log_softmax(m(x, u))
        return -jnp.take_along_axis(lp, y[:, None], axis=1).sum()

    m = WithUser()
    x, y = data(B=5, T=5)
    u = jnp.asarray([3, 0, 3, 9, 1], jnp.int32)
    _, grads = embgrad.value_and_gradients(loss, m, x, u, y)
    ref = per_example_reference(loss, m, x, u, y, path=("user", "embedding"))
    pe = grads["user"].per_example()
    np.testing.assert_allclose(np.asarray(pe.to_dense()), ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pe.norms()), np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)


def test_an_empty_batch_gives_empty_results_eagerly_and_under_nnx_jit():
    m = Classifier()
    x, y = jnp.zeros((0, 7), jnp.int32), jnp.zeros((0,), jnp.int32)
    loss, grads = embgrad.value_and_gradients(xent, m, x, y)
    assert float(loss) == 0.0
    pe = grads["emb"].per_example()
    assert pe.batch_size == 0 and np.asarray(pe.norms()).shape == (0,)
    assert np.asarray(pe.to_dense()).shape == (0, V, D)
    rg = grads["emb"].weight_grad
    assert np.asarray(rg.rows).shape == (0,) and not np.asarray(rg.to_dense()).any()

    @nnx.jit
    def step(m, x, y):
        _, g = embgrad.value_and_gradients(xent, m, x, y)
        return g["emb"].per_example().norms(), g["emb"].weight_grad.to_dense()

    norms, dense = step(m, x, y)
    assert np.asarray(norms).shape == (0,) and np.asarray(dense).shape == (V, D) and not np.asarray(dense).any()


@pytest.mark.parametrize("call, name", [
    (lambda m, x: embgrad.attribute(m, x, target=1, method="saliency"), "embgrad.attribute"),
    (lambda m, x: embgrad.attribute(m, x, target=1, method="integrated_gradients"), "embgrad.attribute"),
    (lambda m, x: embgrad.hotflip(m, x, target=1), "embgrad.hotflip"),
    (lambda m, x: embgrad.jacobian(m, x), "embgrad.jacobian"),
    (lambda m, x: embgrad.attribute_generation(m, x, x[:, :2]), "embgrad.attribute_generation"),
    (lambda m, x: embgrad.generation.hotflip_generation(m, x, x[:, :2]), "embgrad.generation.hotflip_generation"),
])
def test_attribution_on_an_nnx_model_says_it_is_not_available_for_jax_and_what_to_use(call, name):
    m = Classifier()
    x, _ = data()
    with pytest.raises(EmbgradError, match=rf"^{name} is not available for JAX.*value_and_gradients.*output_grad"):
        call(m, x)


def test_one_embed_under_two_attribute_paths_is_one_table_and_the_second_name_says_so():
    class Shared(nnx.Module):
        def __init__(self):
            e = nnx.Embed(V, D, rngs=nnx.Rngs(0))
            self.a, self.b = e, e

        def __call__(self, x):
            return jnp.tanh(self.b(x)).sum()

    m = Shared()
    x, _ = data()
    loss_fn = lambda m, x: m(x)  # noqa: E731
    _, grads = embgrad.value_and_gradients(loss_fn, m, x)
    assert list(grads) == ["a"]
    np.testing.assert_allclose(np.asarray(grads["a"].weight_grad.to_dense()),
                               dense_table_grad(loss_fn, m, x, path=("a", "embedding")), atol=1e-6)
    with pytest.raises(EmbgradError, match=r"layer 'b' is the same nnx.Embed module as 'a'.*layers='a'"):
        embgrad.value_and_gradients(loss_fn, m, x, layers="b")
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'c'.*closest names: 'a'"):
        embgrad.value_and_gradients(loss_fn, m, x, layers="c")


def test_rows_from_lookups_on_jax_arrays():
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, V, (4, 5)), jnp.int32)
    og = jnp.asarray(r.normal(size=(4, 5, D)), jnp.float32)
    pe = embgrad.rows_from_lookups(ids, og, V, per_example=True)
    dense = np.zeros((4, V, D), np.float32)
    for b in range(4):
        np.add.at(dense[b], np.asarray(ids[b]), np.asarray(og[b]))
    np.testing.assert_allclose(np.asarray(pe.to_dense()), dense, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pe.sum().to_dense()), dense.sum(0), atol=1e-5)
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.rows_from_lookups(ids.at[0, 0].set(V), og, V)


def test_rows_from_lookups_refuses_int32_key_overflow():
    ids = jnp.zeros((3, 2), jnp.int32)
    og = jnp.ones((3, 2, 4), jnp.float32)
    with pytest.raises(EmbgradError, match=r"overflow int32.*jax_enable_x64"):
        embgrad.rows_from_lookups(ids, og, 2 ** 30, per_example=True)
    # value_and_gradients keys never exceed B*T: a huge table is fine
    assert embgrad.rows_from_lookups(ids, og, 2 ** 30).norm() > 0


def test_unique_static_matches_numpy_eagerly_and_under_jit():
    from embgrad.backends.jax_ops import unique_static

    r = np.random.default_rng(3)
    for n, hi in ((1, 5), (17, 4), (40, 1000)):
        x = jnp.asarray(r.integers(0, hi, n), jnp.int32)
        u_ref, inv_ref = np.unique(np.asarray(x), return_inverse=True)
        u, inv = jax.jit(unique_static)(x)
        u, inv = np.asarray(u), np.asarray(inv)
        k = len(u_ref)
        np.testing.assert_array_equal(u[:k], u_ref)
        np.testing.assert_array_equal(inv, inv_ref.reshape(-1))
        assert np.all(np.diff(u) > 0) and np.all(u[k:] > u_ref.max())   # sentinels: above, distinct


def test_table_reads_and_assigns_the_nnx_param_and_freeze_says_what_to_do():
    m = Classifier()
    t = embgrad.table(m, "emb")
    assert (t.num_rows, t.dim) == (V, D) and "backend=jax" in repr(t)
    np.testing.assert_array_equal(t[[1, 4]], np.asarray(m.emb.embedding[...])[[1, 4]])
    t.assign([3], np.full((1, D), 2.0, np.float32))
    np.testing.assert_array_equal(np.asarray(m.emb.embedding[...])[3], 2.0)
    with pytest.raises(EmbgradError, match=r"'emb'.*JAX has none.*optax.masked"):
        t.freeze([1])


def test_a_layer_called_through_an_nnx_transform_copy_is_refused_not_missed():
    m = Classifier()
    x, y = data()

    def loss(mm, x, y):
        h = nnx.remat(lambda e, ids: e(ids))(mm.emb, x)     # nnx.remat re-merges a copy of emb
        lp = jax.nn.log_softmax(mm.out(jnp.tanh(h).mean(1)))
        return -jnp.take_along_axis(lp, y[:, None], 1).sum()

    with pytest.raises(EmbgradError, match="copy of itself.*nnx.remat"):
        embgrad.value_and_gradients(loss, m, x, y)


def test_the_model_may_be_the_embed_itself():
    emb = nnx.Embed(V, D, rngs=nnx.Rngs(0))
    x, _ = data()
    w = jnp.linspace(-1, 1, D)
    loss = lambda e, x: jnp.sum(jnp.tanh(e(x)) @ w)   # noqa: E731
    _, grads = embgrad.value_and_gradients(loss, emb, x)
    g = grads.only()
    dense = np.asarray(nnx.grad(loss)(emb, x)["embedding"][...])
    np.testing.assert_allclose(np.asarray(g.weight_grad.to_dense()), dense, atol=1e-6)


def test_a_keras_model_is_told_where_to_go():
    keras = pytest.importorskip("keras")
    m = keras.Sequential([keras.layers.Embedding(10, 4)])
    with pytest.raises(EmbgradError, match=r"Keras model.*embgrad.capture.*KERAS_BACKEND=jax"):
        embgrad.value_and_gradients(lambda mm, x: mm(x).sum(), m, np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("kind", ["has_aux", "dict", "number"])
def test_a_loss_fn_that_returns_no_scalar_array_gets_the_fix(kind):
    """loss_fn returning (loss, aux) as for nnx.value_and_grad(has_aux=True), a dict, or a
    Python number: an EmbgradError that says what value_and_gradients takes (newcomer #13)."""
    e = nnx.Embed(10, 3, rngs=nnx.Rngs(0))
    x = jnp.array([[1, 2], [3, 4]])
    fn = {"has_aux": lambda m, x: (m(x).sum(), m(x)),
          "dict": lambda m, x: {"loss": m(x).sum()},
          "number": lambda m, x: 1.0}[kind]
    match = {"has_aux": "has no has_aux", "dict": r"keys \['loss'\]", "number": "was not called"}[kind]
    with pytest.raises(embgrad.EmbgradError, match=match):
        embgrad.value_and_gradients(fn, e, x)
