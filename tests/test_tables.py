"""embgrad.table on PyTorch: read, assign (and undo), freeze rows under real optimizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, snapshot


class TwoTables(nn.Module):
    def __init__(self, V=30, D=6):
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(V, D, padding_idx=0)
        self.tags = nn.Embedding(5, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, t):
        return self.head(self.words(x).mean(1) + self.tags(t).mean(1))


class Classifier(nn.Module):
    def __init__(self, V=40, D=8, sparse=False, tied=False):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(V, D, sparse=sparse)
        self.out = nn.Linear(D, V, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).mean(1))


def _batches(n=4, B=8, T=5, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B,), generator=g))
            for _ in range(n)]


def _train(model, opt, steps=4, V=40):
    for x, y in _batches(steps, V=V):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------- the view
def test_table_properties_and_layer_selection():
    m = TwoTables()
    t = embgrad.table(m, "words")
    assert (t.num_rows, t.dim, t.dtype, len(t)) == (30, 6, "float32", 30)
    assert t.variable is m.words.weight
    assert t.trainable and not t.lora and t.frozen_rows.size == 0
    assert "Table('words', num_rows=30, dim=6, dtype=float32, backend=torch" in repr(t)
    assert embgrad.table(m, m.tags).variable is m.tags.weight
    assert embgrad.table(m.tags).num_rows == 5                        # a layer on its own
    assert embgrad.table(t) is t
    with pytest.raises(EmbgradError, match=r"2 embedding layers \('words', 'tags'\); pass layer="):
        embgrad.table(m)
    with pytest.raises(EmbgradError, match="closest names: 'words'"):
        embgrad.table(m, "word")
    with pytest.raises(EmbgradError, match="no embedding layer"):
        embgrad.table(nn.Linear(3, 3))


def test_read_rows_as_numpy_in_every_shape_and_leaves_model_alone():
    m = TwoTables()
    before = snapshot(m)
    t = embgrad.table(m, "words")
    W = m.words.weight.detach().numpy()
    np.testing.assert_array_equal(t[3], W[3])
    np.testing.assert_array_equal(t[[4, 1, 4]], W[[4, 1, 4]])
    np.testing.assert_array_equal(t[np.array([[1, 2], [3, 4]])], W[[[1, 2], [3, 4]]])
    np.testing.assert_array_equal(t[torch.tensor([7, 8])], W[[7, 8]])
    np.testing.assert_array_equal(t[2:5], W[2:5])
    mask = np.zeros(30, bool)
    mask[[5, 9]] = True
    np.testing.assert_array_equal(t[mask], W[[5, 9]])
    np.testing.assert_array_equal(t.numpy(), W)
    assert t[[]].shape == (0, 6)
    assert isinstance(t[3], np.ndarray)
    assert_unchanged(m, before)


@pytest.mark.parametrize("ids, match", [
    ([1, 30], r"id 30 is out of range for a table of 30 rows \(valid ids are 0..29\)"),
    ([-1], "id -1 is out of range"),
    ([1.0, 2.0], "must be integer row ids, got dtype float64"),
    (np.ones(29, bool), r"boolean mask of ids must have shape \(30,\)"),
])
def test_bad_ids_are_refused(ids, match):
    t = embgrad.table(TwoTables(), "words")
    with pytest.raises(EmbgradError, match=match):
        t[ids]


# ---------------------------------------------------------------------------- assign
def test_assign_writes_in_place_returns_previous_and_undoes():
    m = TwoTables()
    w = m.words.weight
    t = embgrad.table(m, "words")
    orig = w.detach().clone()
    new = np.arange(12, dtype=np.float64).reshape(2, 6)              # float64 is cast to float32
    prev = t.assign([4, 2], new)
    np.testing.assert_array_equal(prev, orig[[4, 2]].numpy())
    np.testing.assert_array_equal(w.detach()[[4, 2]].numpy(), new.astype(np.float32))
    assert m.words.weight is w and w.is_leaf and w.requires_grad and w.grad is None and w.grad_fn is None
    others = [i for i in range(30) if i not in (2, 4)]
    assert torch.equal(w.detach()[others], orig[others])
    # a single row, and a torch tensor of values
    prev1 = t.assign(7, torch.full((6,), 0.5))
    assert prev1.shape == (6,) and torch.equal(w.detach()[7], torch.full((6,), 0.5))
    t.assign(7, prev1)
    t.assign([4, 2], prev)                                            # undo
    assert torch.equal(w.detach(), orig)
    # the model still trains normally after writes (no autograd history was recorded)
    x = torch.randint(0, 30, (3, 4))
    m(x, torch.zeros(3, 2, dtype=torch.long)).sum().backward()
    assert w.grad is not None and w.grad.shape == (30, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_assign_and_read_low_and_high_precision_tables(dtype):
    emb = nn.Embedding(10, 4).to(dtype)
    t = embgrad.table(emb)
    assert t.dtype == str(dtype).replace("torch.", "")
    vals = np.array([[0.5, -1.25, 3.0, 0.0]], np.float32)
    t.assign([3], vals)
    got = t[[3]]
    assert got.dtype == (np.float64 if dtype == torch.float64 else
                         np.float16 if dtype == torch.float16 else np.float32)   # bfloat16 reads as float32
    np.testing.assert_array_equal(got.astype(np.float32), vals)
    assert emb.weight.dtype == dtype


def test_assign_checks_shape_dtype_values():
    t = embgrad.table(TwoTables(), "words")
    with pytest.raises(EmbgradError, match=r"vectors have shape \(2, 5\) but 2 ids of a table of dimension 6 "
                                           r"need shape \(2, 6\)"):
        t.assign([1, 2], np.zeros((2, 5)))
    with pytest.raises(EmbgradError, match=r"must be floating point, got dtype int64 \(did you pass ids\?\)"):
        t.assign([1], np.zeros((1, 6), np.int64))
    with pytest.raises(EmbgradError, match="the vector for id 2 holds NaN/Inf"):
        t.assign([1, 2], np.array([[0.0] * 6, [0.0] * 5 + [np.nan]]))
    with pytest.raises(EmbgradError, match="id 3 appears 2 times"):
        t.assign([3, 3], np.zeros((2, 6)))
    with pytest.raises(EmbgradError, match="assign\\(\\) takes an int or a 1-D list of ids"):
        t.assign([[1, 2]], np.zeros((1, 2, 6)))
    with pytest.raises(EmbgradError, match="expected a NumPy array, a list or a framework tensor, got object"):
        t.assign([1], object())
    half = embgrad.table(nn.Embedding(4, 2).half())
    with pytest.raises(EmbgradError, match="magnitude 1e\\+05 does not fit the table's dtype float16"):
        half.assign(0, np.array([1e5, 0.0]))


def test_frozen_and_quantized_tables_are_refused():
    emb = nn.Embedding.from_pretrained(torch.zeros(6, 3), freeze=True)
    t = embgrad.table(emb)
    assert not t.trainable and "not trainable" in repr(t)
    with pytest.raises(EmbgradError, match=r"is frozen \(not trainable\).*force=True"):
        t.assign([1], np.ones((1, 3)))
    t.assign([1], np.ones((1, 3)), force=True)
    assert torch.equal(emb.weight[1], torch.ones(3)) and not emb.weight.requires_grad
    with pytest.raises(EmbgradError, match="frozen as a whole"):
        t.freeze([1])
    # a table whose weight holds integers (quantized codes) cannot take float rows
    q = nn.Embedding(6, 3)
    q.weight = nn.Parameter(torch.zeros(6, 3, dtype=torch.int8), requires_grad=False)
    tq = embgrad.table(q)
    assert tq.dtype == "int8"
    with pytest.raises(EmbgradError, match=r"assign\(\) cannot write float rows into it: its weight has dtype torch.int8 "
                                           r"\(quantized\); write the float table before quantizing"):
        tq.assign([0], np.ones((1, 3)), force=True)


# ---------------------------------------------------------------------------- freeze
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.05),
], ids=["sgd_momentum", "adam"])
def test_frozen_rows_stay_bit_identical_under_training(make_opt):
    m = Classifier()
    t = embgrad.table(m)
    frozen = [0, 3, 7, 11]
    x_all = torch.cat([x for x, _ in _batches()])
    assert set(frozen) <= set(x_all.unique().tolist())                # they do get gradient
    before = m.emb.weight.detach().clone()
    guard = t.freeze(frozen)
    assert np.array_equal(guard.rows, frozen) and np.array_equal(t.frozen_rows, frozen)
    _train(m, make_opt(m.parameters()))
    after = m.emb.weight.detach()
    assert torch.equal(after[frozen], before[frozen])
    touched = sorted(set(x_all.unique().tolist()) - set(frozen))
    assert (after[touched] != before[touched]).any(1).all()           # every other looked-up row moved
    # the mask zeroes exactly the frozen rows of .grad
    assert torch.all(m.emb.weight.grad[frozen] == 0)


def test_unfreeze_removes_the_hook_and_training_moves_rows_again():
    m = Classifier()
    hooks_before = m.emb.weight._backward_hooks
    t = embgrad.table(m)
    guard = t.freeze([1, 2])
    assert m.emb.weight._backward_hooks
    t.unfreeze()
    assert not m.emb.weight._backward_hooks or m.emb.weight._backward_hooks == hooks_before
    assert t.frozen_rows.size == 0 and not guard.active
    guard.remove()                                                     # idempotent
    before = m.emb.weight.detach().clone()
    _train(m, torch.optim.SGD(m.parameters(), lr=0.5), steps=6)
    assert not torch.equal(m.emb.weight.detach()[[1, 2]], before[[1, 2]])


def test_freeze_adds_rows_and_unfreeze_some_keeps_the_rest():
    m = Classifier()
    t = embgrad.table(m)
    t.freeze([5])
    t.freeze(torch.tensor([2, 9]))
    assert t.frozen_rows.tolist() == [2, 5, 9]
    assert len(m.emb.weight._backward_hooks) == 1                      # one guard, not three
    assert embgrad.table(m).frozen_rows.tolist() == [2, 5, 9]           # any view sees it
    t.unfreeze([5])
    assert t.frozen_rows.tolist() == [2, 9]
    with pytest.raises(EmbgradError, match=r"rows \[2\] are frozen with freeze\(\)"):
        t.assign([2, 3], np.zeros((2, 8)))
    t.assign([2, 3], np.zeros((2, 8)), force=True)
    with pytest.raises(EmbgradError, match="freeze\\(\\) got no ids"):
        t.freeze([])
    t.unfreeze()


def test_weight_decay_does_not_move_frozen_rows():
    """AdamW's decoupled decay (and weight_decay= of any torch optimizer) ignores the gradient,
    so the mask alone cannot keep rows still: the rows are put back after each step, by the
    optimizer given, or by any optimizer holding the table (issue 12 item 4)."""
    frozen = [0, 3, 7]
    m = Classifier()
    t = embgrad.table(m)
    before = m.emb.weight.detach().clone()
    t.freeze(frozen)
    _train(m, torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1))
    assert torch.equal(m.emb.weight.detach()[frozen], before[frozen])
    t.unfreeze()

    m = Classifier()
    t = embgrad.table(m)
    before = m.emb.weight.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)
    t.freeze(frozen, optimizer=opt)
    _train(m, opt)
    after = m.emb.weight.detach()
    assert torch.equal(after[frozen], before[frozen])
    assert (after[[1, 2, 4]] != before[[1, 2, 4]]).any()
    t.unfreeze()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_freeze_checks_the_optimizer():
    m = Classifier()
    t = embgrad.table(m)
    with pytest.raises(EmbgradError, match="does not update this table's weight"):
        t.freeze([1], optimizer=torch.optim.SGD(m.out.parameters(), lr=0.1))
    with pytest.raises(EmbgradError, match="must be a torch.optim.Optimizer, got str"):
        t.freeze([1], optimizer="adam")
    assert t.frozen_rows.size == 0 and not m.emb.weight._backward_hooks


def test_freeze_sparse_gradients_with_sparse_adam():
    m = Classifier(sparse=True)
    t = embgrad.table(m)
    before = m.emb.weight.detach().clone()
    t.freeze([0, 3, 7])
    opt = torch.optim.SparseAdam([m.emb.weight], lr=0.05)
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        assert m.emb.weight.grad.is_sparse
        opt.step()
    after = m.emb.weight.detach()
    assert torch.equal(after[[0, 3, 7]], before[[0, 3, 7]])
    assert not torch.equal(after[[1, 2, 4]], before[[1, 2, 4]])
    t.unfreeze()


def test_freeze_a_tied_table_masks_the_head_part_too():
    m = Classifier(tied=True)
    t = embgrad.table(m)
    before = m.emb.weight.detach().clone()
    t.freeze([5, 6])
    _train(m, torch.optim.Adam(m.parameters(), lr=0.05))
    assert torch.equal(m.emb.weight.detach()[[5, 6]], before[[5, 6]])
    t.unfreeze()


def test_table_of_a_hugging_face_model_is_its_input_embeddings():
    """embgrad.table(BertModel) picks get_input_embeddings() (as attribute does), not an error
    about its three embedding layers; another table is still reachable by name."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=12)
    bert = transformers.BertModel(cfg)
    t = embgrad.table(bert)
    assert t.name == "embeddings.word_embeddings"
    np.testing.assert_array_equal(t.numpy(), bert.get_input_embeddings().weight.detach().numpy())
    assert embgrad.table(bert, "embeddings.position_embeddings").name == "embeddings.position_embeddings"

    class TwoTables(torch.nn.Module):          # no get_input_embeddings: still ambiguous
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Embedding(4, 2), torch.nn.Embedding(5, 2)
    with pytest.raises(EmbgradError, match="2 embedding layers"):
        embgrad.table(TwoTables())
