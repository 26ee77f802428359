"""Issue 12 item 6: captures are isolated per thread / ``contextvars`` context, and no exit
order leaves a hook or patch behind (PyTorch and Keras 3 on TensorFlow).

A forward of the same model in another thread must not land in the active capture; two threads
capturing the same (or different) models at the same time each get exactly their own gradients.
References: the framework's own autograd (dense table gradient of the whole batch, and per
example a loop of one-example backward passes)."""
from __future__ import annotations

import os
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import embgrad

V, D, T = 20, 3, 4


def _ids(seed, B=3):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def _run_threads(*fns):
    """Run fns in threads; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:   # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def _capture_in_two_threads(models, xs, loss_fn):
    """Each of two threads captures models[k] on xs[k], both captures active at once; returns
    per thread (number of recorded calls, dense weight gradient, dense per-example gradients)."""
    barrier = threading.Barrier(2)
    results: dict[int, tuple] = {}

    def worker(k):
        def run():
            m, x = models[k], xs[k]
            with embgrad.capture(m) as cap:
                barrier.wait()                     # both captures active
                loss = loss_fn(m, x)
                barrier.wait()                     # both forwards done
            g = cap.gradients(loss)["emb"]
            results[k] = (len(g.calls), g.weight_grad.to_dense().numpy(), g.per_example().to_dense().numpy())
        return run

    _run_threads(worker(0), worker(1))
    return [results[0], results[1]]


# ---------------------------------------------------------------------------- PyTorch
torch = pytest.importorskip("torch")


class _TorchModel(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, D)
        self.head = torch.nn.Linear(D, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1)).squeeze(1)


def _torch_loss(model, x):
    return (model(torch.as_tensor(x)) ** 2).sum()


def _torch_dense(model, x):
    model.zero_grad()
    _torch_loss(model, x).backward()
    g = model.emb.weight.grad.clone()
    model.zero_grad()
    return g.numpy()


def _torch_per_example(model, x):
    return np.stack([_torch_dense(model, x[b:b + 1]) for b in range(len(x))])


def _torch_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_torch_forward_in_another_thread_is_not_recorded():
    model = _TorchModel()
    x, other = _ids(0), _ids(1, B=7)
    ref_other = model(torch.as_tensor(other)).detach()
    with embgrad.capture(model) as cap:
        seen = []
        _run_threads(lambda: seen.append(model(torch.as_tensor(other)).detach()))   # not ours
        loss = _torch_loss(model, x)
    torch.testing.assert_close(seen[0], ref_other)
    g = cap.gradients(loss)["emb"]
    assert len(g.calls) == 1 and g.per_example().batch_size == 3
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), _torch_dense(model, x), atol=1e-6)
    assert _torch_hooks(model) == 0


@pytest.mark.parametrize("same_model", [True, False])
def test_torch_two_threads_capture_at_the_same_time(same_model):
    models = [_TorchModel(0), _TorchModel(0) if not same_model else None]
    models[1] = models[1] or models[0]
    xs = [_ids(2, B=3), _ids(3, B=5)]
    results = _capture_in_two_threads(models, xs, _torch_loss)
    for k in (0, 1):
        calls, dense, per_example = results[k]
        assert calls == 1
        np.testing.assert_allclose(dense, _torch_dense(models[k], xs[k]), atol=1e-6)
        np.testing.assert_allclose(per_example, _torch_per_example(models[k], xs[k]), atol=1e-6)
    assert _torch_hooks(models[0]) == 0 and _torch_hooks(models[1]) == 0


@pytest.mark.parametrize("raise_in", [None, "forward"])
def test_torch_overlapping_captures_exit_out_of_order(raise_in):
    model = _TorchModel()
    x = _ids(4)
    a = embgrad.capture(model).__enter__()
    b = embgrad.capture(model).__enter__()
    loss = _torch_loss(model, x)
    a.__exit__(None, None, None)                   # the first one leaves first
    loss2 = _torch_loss(model, x)                  # b is still active: recorded by b only
    if raise_in == "forward":
        with pytest.raises(RuntimeError):
            model.head(torch.zeros(2, D + 1))      # user code raising while b is active
    b.__exit__(None, None, None)
    assert _torch_hooks(model) == 0
    _torch_loss(model, x)                          # after both: recorded by neither
    assert len(a.calls) == 1 and len(b.calls) == 2
    ref = _torch_dense(model, x)
    ga = a.gradients(loss, retain_graph=True)["emb"]
    np.testing.assert_allclose(ga.weight_grad.to_dense().numpy(), ref, atol=1e-6)
    gb = b.gradients(loss + loss2)["emb"]
    np.testing.assert_allclose(gb.weight_grad.to_dense().numpy(), 2 * ref, atol=1e-6)


# ---------------------------------------------------------------------------- Keras on TensorFlow
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _keras_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((T,), dtype="int32"), keras.layers.Embedding(V, D, name="emb"),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])


def _keras_loss(model, x):
    return tf.reduce_sum(model(x) ** 2)


def _keras_dense(model, x):
    table = model.get_layer("emb").embeddings
    with tf.GradientTape() as tape:
        loss = _keras_loss(model, x)
    return tf.convert_to_tensor(tape.gradient(loss, table)).numpy()


def _keras_per_example(model, x):
    return np.stack([_keras_dense(model, x[b:b + 1]) for b in range(len(x))])


def _keras_clean(model):
    layer = model.get_layer("emb")
    return "call" not in layer.__dict__ and "quantized_call" not in layer.__dict__


def test_keras_forward_in_another_thread_is_not_recorded():
    model = _keras_model()
    x, other = _ids(0), _ids(1, B=7)
    ref_other = model(other).numpy()
    with embgrad.capture(model) as cap:
        seen = []
        _run_threads(lambda: seen.append(model(other).numpy()))
        loss = _keras_loss(model, x)
    np.testing.assert_allclose(seen[0], ref_other, atol=1e-6)
    g = cap.gradients(loss)["emb"]
    assert len(g.calls) == 1 and g.per_example().batch_size == 3
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), _keras_dense(model, x), atol=1e-6)
    assert _keras_clean(model)


def test_keras_bad_ids_in_another_thread_are_not_checked_by_this_capture():
    """The other thread's forward runs as without embgrad (Keras's own behaviour)."""
    model = _keras_model()
    with embgrad.capture(model) as cap:
        out = []
        _run_threads(lambda: out.append(model(np.array([[1, 2, 3, 4]], np.int32)).numpy()))
        loss = _keras_loss(model, _ids(0))
    assert out[0].shape == (1, 1) and len(cap.calls) == 1


@pytest.mark.parametrize("same_model", [True, False])
def test_keras_two_threads_capture_at_the_same_time(same_model):
    models = [_keras_model(0)]
    models.append(models[0] if same_model else _keras_model(1))
    xs = [_ids(2, B=3), _ids(3, B=5)]
    results = _capture_in_two_threads(models, xs, _keras_loss)
    for k in (0, 1):
        calls, dense, per_example = results[k]
        assert calls == 1
        np.testing.assert_allclose(dense, _keras_dense(models[k], xs[k]), atol=1e-6)
        np.testing.assert_allclose(per_example, _keras_per_example(models[k], xs[k]), atol=1e-6)
    assert _keras_clean(models[0]) and _keras_clean(models[1])


@pytest.mark.parametrize("raise_in", [None, "forward"])
def test_keras_overlapping_captures_exit_out_of_order(raise_in):
    model = _keras_model()
    layer = model.get_layer("emb")
    keys = sorted(layer.__dict__)
    x = _ids(4)
    a = embgrad.capture(model).__enter__()
    b = embgrad.capture(model).__enter__()
    loss = _keras_loss(model, x)
    a.__exit__(None, None, None)                   # the first one leaves first
    loss2 = _keras_loss(model, x)                  # b is still active
    total = loss + loss2                           # (TensorFlow: computed while b's tape records)
    if raise_in == "forward":
        with pytest.raises(EmbgradError):
            model(np.array([[0, 1, 2, V]], np.int32))   # refused by b while active
    b.__exit__(None, None, None)
    assert _keras_clean(model) and sorted(layer.__dict__) == keys
    model(x)                                       # after both: recorded by neither
    assert len(a.calls) == 1 and len(b.calls) == 2
    ref = _keras_dense(model, x)
    np.testing.assert_allclose(a.gradients(loss)["emb"].weight_grad.to_dense().numpy(), ref, atol=1e-6)
    gb = b.gradients(total)["emb"]
    np.testing.assert_allclose(gb.weight_grad.to_dense().numpy(), 2 * ref, atol=1e-6)


def test_keras_user_patch_on_top_is_left_alone():
    """A method the user set on the layer while a capture was active stays theirs."""
    model = _keras_model()
    layer = model.get_layer("emb")
    with embgrad.capture(model):
        own = layer.call
        layer.__dict__["call"] = lambda *a, **k: own(*a, **k)
        mine = layer.__dict__["call"]
    assert layer.__dict__["call"] is mine
    del layer.__dict__["call"]


from embgrad import EmbgradError  # noqa: E402
