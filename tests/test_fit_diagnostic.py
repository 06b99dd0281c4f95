"""gradient_fit: the first-step gradient it measures, LoRA's share of it, LSR's fit, the recommendation, bad input."""
import math

import pytest
import torch

import lsr_compile as lc
from lsr_compile import fit_diagnostic as gf, formulations, workloads
from lsr_compile.config import resolve_shapes


def _batch(seed=0, vocab=128):
    ids = torch.randint(3, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _reference_grads(model, targets, batches):
    """dL/dW by plain autograd on a copy whose every parameter trains, as (d_out, d_in) float64."""
    import copy

    ref = copy.deepcopy(model).eval()
    for b in batches:
        ref(**b).loss.backward()
    out = {}
    for n, m in ref.named_modules():
        if n.split(".")[-1] in targets:
            g = m.weight.grad.double()
            out[n] = g.T if type(m).__name__ == "Conv1D" else g
    return out


@pytest.mark.parametrize("family,targets", [("llama", ("q_proj", "v_proj", "down_proj")), ("gpt2", ("c_attn",))])
def test_lora_share_is_the_gradients_top_singular_energy(family, targets):
    model = workloads.tiny_decoder(family, hidden=64, vocab=128, seed=1)
    batches = [_batch(0), _batch(1)]
    fit = lc.gradient_fit(model, batches, target_modules=list(targets), budgets=(0.25,), splits=((2, 2),))
    grads = _reference_grads(model, targets, batches)
    assert set(fit.layers) == set(grads)
    modules = {n: m for n, m in model.named_modules() if n in grads}
    measured = gf._first_step_gradients(model, modules, batches, None)
    for n, g in grads.items():  # element for element: a Conv1D's gradient transposed to (d_out, d_in)
        torch.testing.assert_close(measured[n], g, rtol=1e-5, atol=1e-9)
    for n, g in grads.items():
        assert fit.gradient_energy[n] == pytest.approx(float(g.square().sum()), rel=1e-5)
    total = sum(float(g.square().sum()) for g in grads.values())
    top2 = sum(float(torch.linalg.svdvals(g)[:2].square().sum()) for g in grads.values())
    assert fit.lora(2).energy == pytest.approx(top2 / total, rel=1e-5)
    assert fit.lora(2).params == sum(2 * (m + n) for m, n in fit.layers.values())


def test_the_model_is_left_as_it_was():
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=2).train()
    model.model.layers[0].eval()  # a mixed state, restored module by module
    for n, p in model.named_parameters():
        p.requires_grad_("embed" in n)
    marker = torch.ones_like(model.model.embed_tokens.weight)
    model.model.embed_tokens.weight.grad = marker
    lc.gradient_fit(model, _batch(), target_modules=["q_proj"], budgets=(0.25,), splits=((2, 2),))
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert [p.requires_grad for p in model.parameters()] == ["embed" in n for n, _ in model.named_parameters()]
    assert model.model.embed_tokens.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if "embed" not in n)
    with pytest.raises(ValueError, match="no loss"):  # and after a failure too
        lc.gradient_fit(model, {"input_ids": _batch()["input_ids"]}, target_modules=["q_proj"])
    assert model.training and not model.model.layers[0].training
    assert [p.requires_grad for p in model.parameters()] == ["embed" in n for n, _ in model.named_parameters()]


def test_lsr_follows_all_of_a_gradient_it_can_represent():
    """A G that is exactly B A with LSR's structure: the fit follows all of it (a fit that stopped at the
    start would not: the nearest Kronecker sums of rank-q SVD factors need not be B and A)."""
    f = resolve_shapes(48, 40, s=3, r=(2, 2))
    gen = torch.Generator().manual_seed(0)
    A1, A2, B1, B2 = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in
                      ((f.s, f.r1, f.n1), (f.s, f.r2, f.n2), (f.s, f.m1, f.r1), (f.s, f.m2, f.r2)))
    G = formulations.build_B(B1, B2) @ formulations.build_A(A1, A2)
    svd = torch.linalg.svd(G, full_matrices=False)
    got = gf._lsr_followed([svd], f, iters=200)[0]
    assert got == pytest.approx(float(G.square().sum()), rel=1e-4)


def test_lsr_never_follows_more_than_lora_of_its_inner_rank():
    """ΔW = B A has rank <= q: no LSR fit can beat the top-q singular energy, and with enough terms it reaches it."""
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=3)
    many = lc.LSRConfig(s=16, r=(2, 2))  # 8x8 factors: A and B rearranged are 16 x 16, so 16 terms make any rank 4
    fit = lc.gradient_fit(model, _batch(), target_modules=["q_proj", "o_proj"], budgets=(0.5,), splits=((2, 2),),
                          configs=[many], lora_ranks=(4,), iters=100)
    lora4 = fit.lora(4)
    assert {c.config.inner_rank for c in fit.lsr()} == {4}
    for c in fit.lsr():
        assert all(c.per_layer[n] <= lora4.per_layer[n] + 1e-9 for n in fit.layers)
    unconstrained = next(c for c in fit.lsr() if c.config.s == 16)
    assert unconstrained.energy == pytest.approx(lora4.energy, abs=2e-3)


def test_recommend_is_the_best_lsr_within_the_budget():
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=4)
    fit = lc.gradient_fit(model, _batch(), target_modules=["q_proj", "v_proj"])
    for b in gf.DEFAULT_BUDGETS:
        inside = [c for c in fit.lsr() if c.params <= b * fit.lora8_params]
        best = fit.recommend(b)
        assert best == max(inside, key=lambda c: c.energy).config
        assert sum(best.for_layer(n).shapes_for(*d).num_params for n, d in fit.layers.items()) \
            <= b * fit.lora8_params
    assert "LoRA r=8" in fit.table() and "LSR s=" in str(fit)
    with pytest.raises(ValueError, match="no LSR candidate within budget=0.01"):
        fit.recommend(0.01)


def test_a_classifier_with_a_loss_function():
    """An encoder classifier whose loss is the caller's: the gradient is that loss's."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    ids = torch.randint(1, 100, (8, 10))
    labels = torch.randint(0, 2, (8,))
    fit = lc.gradient_fit(model, {"input_ids": ids}, target_modules=["query", "value"], budgets=(0.5,),
                          loss=lambda m, b: torch.nn.functional.cross_entropy(m(**b).logits, labels))
    assert len(fit.layers) == 4 and 0 < fit.lora(4).energy <= 1 and math.isfinite(fit.lsr()[0].energy)


@pytest.mark.parametrize("kwargs,match", [
    ({"batches": []}, "non-empty iterable"),
    ({"target_modules": ["nothing_here"]}, "match no"),
    ({"budgets": (0,)}, "positive multiples"),
    ({"budgets": (float("nan"),)}, "positive multiples"),
    ({"iters": 0}, "iters must be a positive int"),
])
def test_bad_input_is_named(kwargs, match):
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=5)
    args = {"batches": _batch(), "target_modules": ["q_proj"]} | kwargs
    with pytest.raises(ValueError, match=match):
        lc.gradient_fit(model, args.pop("batches"), **args)


def test_no_loss_and_a_zero_gradient_are_named():
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=6)
    with pytest.raises(ValueError, match="no loss"):
        lc.gradient_fit(model, {"input_ids": _batch()["input_ids"]}, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="gradient is zero"):
        lc.gradient_fit(model, _batch(), target_modules=["q_proj"], loss=lambda m, b: (m(**b).logits * 0).sum())


def test_nearest_kron_sum_is_exact_for_a_kronecker_sum():
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), torch.randn(2, 5, 2, generator=gen,
                                                                                dtype=torch.float64)
    M = formulations.kron_sum(X, Y)
    X2, Y2 = gf.nearest_kron_sum(M, 3, (3, 4), (5, 2))
    torch.testing.assert_close(formulations.kron_sum(X2, Y2), M)
    assert X2[2].abs().max() < 1e-6  # the third term is past the rank: (numerically) zero


def test_cli_on_a_folder(tmp_path, capsys):
    from lsr_compile.cli import main

    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=7)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(120)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(0, 120, (9,), generator=gen))
                              for _ in range(8)))
    assert main(["gradient-fit", "--model", str(tmp_path / "m"), "--text", str(text), "--batches", "2",
                 "--batch-size", "4", "--targets", "q_proj", "v_proj", "--top-layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=8" in out and "Recommended LSR per budget" in out and "2 layers" in out
    for bad in (["--batches", "3"], ["--batch-size", "0"], ["--targets", "nothing", "--top-layers", "1"],
                ["--budgets", "-1"]):
        with pytest.raises(SystemExit):
            main(["gradient-fit", "--model", str(tmp_path / "m"), "--text", str(text)] + bad)


def test_terms_past_what_a_layer_can_use_are_not_proposed():
    """At a large budget a small split would get more terms than its Kronecker sums can hold: the candidate is
    capped there (the same update, fewer parameters), as LSRConfig's warning advises."""
    from lsr_compile.config import useful_terms

    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=8)
    fit = lc.gradient_fit(model, _batch(), target_modules=["q_proj"], budgets=(1.0,), splits=((1, 2),))
    (c,) = fit.lsr()
    f = c.config.shapes_for(64, 64)
    assert c.config.s == useful_terms(1, 2, f.n1, f.n2, f.m1, f.m2) == 8  # 8 x 8 factors, r1 = 1: 8 terms
    assert lc.lsr_config_for_lora((1, 2), budget=4.0, model=model, target_modules=["q_proj"]).s == 21


def test_a_layer_with_no_gradient_and_a_config_that_selects_fewer_layers():
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=9)
    q0 = model.model.layers[0].self_attn.q_proj
    out = {}
    q0.register_forward_hook(lambda m, i, o: out.__setitem__("q0", o))

    def only_q0(m, b):  # the other layers' q_proj get a gradient of zeros
        logits = m(**b).logits
        return out["q0"].square().sum() + 0 * logits.sum()

    top = lc.LSRConfig(s=2, r=(2, 2), layers_to_transform=[1])
    fit = lc.gradient_fit(model, _batch(), target_modules=["q_proj"], budgets=(0.5,), loss=only_q0, configs=[top])
    zero = "model.layers.1.self_attn.q_proj"
    assert fit.gradient_energy[zero] == 0 and math.isnan(fit.lora(4).per_layer[zero])
    assert fit.lora(4).energy > 0
    only_top = fit.candidates[-1]
    assert only_top.config is top and only_top.energy == 0  # it adapts only the layer with no gradient
    assert only_top.params == top.shapes_for(64, 64).num_params


def test_a_layer_that_cannot_be_factored_is_named():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    ids = torch.randint(1, 100, (4, 6))
    with pytest.raises(ValueError, match=r"classifier \(32 -> 2\).*leave it out of target_modules"):
        lc.gradient_fit(model, {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])},
                        target_modules=["query", "classifier"], budgets=(0.5,))


@pytest.mark.parametrize("kwargs,match", [
    ({"target_modules": []}, "target_modules is empty"),
    ({"lora_ranks": (0,)}, "lora_ranks are positive ints"),
    ({"lora_ranks": (-1,)}, "lora_ranks are positive ints"),
])
def test_more_bad_input_is_named(kwargs, match):
    model = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=5)
    with pytest.raises(ValueError, match=match):
        lc.gradient_fit(model, _batch(), **({"target_modules": ["q_proj"]} | kwargs))
