"""Swapping an adapter's weights under a compiled model (peft's hotswap_adapter takes LoRA only): outputs are the
new adapter's, and nothing recompiles."""
import pytest
import torch
from peft import PeftModel, get_peft_model

import lsr_compile as lc
from lsr_compile import workloads
from lsr_compile.bench_decode import nonzero


def _model():
    return workloads.tiny_decoder("llama", hidden=64, layers=2, vocab=128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three adapters of different structures and scales, saved; and their logits on ``ids``."""
    d = tmp_path_factory.mktemp("adapters")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    configs = {"a": lc.LSRConfig(s=2, r=(2, 2)), "b": lc.LSRConfig(s=3, r=(2, 4), alpha=5.0),
               "q only": lc.LSRConfig(s=1, r=(1, 2), target_modules=["q_proj"], scaling="lora", alpha=100.0)}
    logits = {}
    for k, (name, cfg) in enumerate(configs.items()):
        pm = nonzero(get_peft_model(_model(), cfg), seed=k + 1).eval()
        pm.save_pretrained(d / name)
        with torch.no_grad():
            logits[name] = pm(input_ids=ids).logits
    with torch.no_grad():
        logits["base"] = _model()(input_ids=ids).logits
    return d, ids, logits


def test_swapped_under_a_fullgraph_compile_without_recompiling(saved):
    d, ids, logits = saved
    torch._dynamo.reset()
    pm = PeftModel.from_pretrained(_model(), d / "a").eval()
    lc.prepare_model_for_compiled_hotswap(pm, target_s=3, target_r=(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, logits["a"], rtol=1e-5, atol=1e-5)  # padding is exact
    compiled = torch.compile(pm, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, logits["a"], rtol=1e-4, atol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "q only", "a"):
                lc.hotswap_adapter(compiled, d / name)
                torch.testing.assert_close(compiled(input_ids=ids).logits, logits[name], rtol=1e-4, atol=1e-4)
    assert (logits["a"] - logits["b"]).abs().max() > 1e-2 and (logits["q only"] - logits["base"]).abs().max() > 1e-2


def test_swapped_in_eager_decoding_and_saved_as_it_now_is(saved, tmp_path):
    """Eager calls without a graph see the new values (what a layer keeps for decoding is compared by value);
    the prepared, swapped adapter saves and reloads as the new one."""
    d, ids, logits = saved
    pm = PeftModel.from_pretrained(_model(), d / "a").eval()
    with torch.no_grad():
        pm(input_ids=ids)  # what decoding keeps is warm
        lc.hotswap_adapter(pm, d / "q only")  # a smaller structure fits without preparing
        torch.testing.assert_close(pm(input_ids=ids).logits, logits["q only"], rtol=1e-5, atol=1e-5)
    lc.prepare_model_for_compiled_hotswap(pm, target_s=3, target_r=(2, 4))
    lc.hotswap_adapter(pm, d / "b")
    pm.save_pretrained(tmp_path / "now")
    again = PeftModel.from_pretrained(_model(), tmp_path / "now").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, logits["b"], rtol=1e-5, atol=1e-5)


def test_what_does_not_fit_is_refused_before_anything_is_written(saved):
    d, ids, logits = saved
    pm = PeftModel.from_pretrained(_model(), d / "q only").eval()
    with pytest.raises(ValueError, match=r"not a factor of a layer adapter 'default' is on"):
        lc.hotswap_adapter(pm, d / "a")  # v_proj too: a new layer
    pm = PeftModel.from_pretrained(_model(), d / "a").eval()
    with pytest.raises(ValueError, match=r"do not fit.*prepare_model_for_compiled_hotswap\(target_s"):
        lc.hotswap_adapter(pm, d / "b")  # more terms and a larger inner rank than the model holds
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, logits["a"], rtol=1e-5, atol=1e-5)  # untouched
    with pytest.raises(ValueError, match="before torch.compile"):
        lc.prepare_model_for_compiled_hotswap(torch.compile(pm), target_s=3)
    with pytest.raises(ValueError, match="above target_s"):
        lc.prepare_model_for_compiled_hotswap(pm, target_s=1)
