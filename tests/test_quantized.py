"""LSR over a quantized frozen base (torchao weight-only int8, and intx int4 where the CPU build has it): the
base runs its library's kernels without a full-precision copy, the adapter runs beside it, values and
gradients match the dequantized reference, peft's order works, merging refuses, the format is in the key."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lsr_compile as lc
from lsr_compile import dispatch, reference
from lsr_compile.quantized import base_format

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402

CONFIGS = {"int8_weight_only": Int8WeightOnlyConfig,
           "intx_weight_only": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}


def _quantized_layer(fmt, d_in=96, d_out=64):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out)
    model = torch.nn.Sequential(lin)
    quantize_(model, CONFIGS[fmt]())
    layer = lc.LSRLinear.from_linear(model[0], lc.LSRConfig(s=3, r=(2, 2), init="reference"))
    with torch.no_grad():
        for p in (layer.A1, layer.A2, layer.B1, layer.B2):
            p.normal_(0, 0.3)
    return layer


def _int8_bert():
    """The tiny BERT with its encoder's linear layers int8-quantized (peft's order: quantize, then adapt)."""
    from models import tiny_bert

    model = tiny_bert()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and "classifier" not in fqn)
    return model


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_values_and_gradients_match_the_dequantized_reference(fmt, fresh_dispatch):
    layer = _quantized_layer(fmt)
    assert base_format(layer.weight) == fmt
    W = layer.weight.dequantize().detach()
    x = torch.randn(5, 7, 96, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    fs = [p.detach().clone().requires_grad_(True) for p in (layer.A1, layer.A2, layer.B1, layer.B2)]
    want = reference.lsr_linear(xr, W, layer.bias, *fs, layer.scale)
    # the quantized GEMM itself differs from the dequantized one by rounding of the activations' products
    torch.testing.assert_close(y, want, atol=5e-3 * want.abs().max().item(), rtol=1e-2)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=5e-3 * xr.grad.abs().max().item(), rtol=1e-2)
    for p, f in zip((layer.A1, layer.A2, layer.B1, layer.B2), fs):
        torch.testing.assert_close(p.grad, f.grad, atol=1e-4, rtol=1e-3)
    ops = {op for op, _ in dispatch.cached_choices()}
    assert {"adapter_forward", "adapter_backward"} <= ops and "forward" not in ops


def test_no_torchao_weight_class_passes_for_a_dense_weight():
    """Every torchao tensor subclass (CUDA-only layouts such as tinygemm's Int4TilePackedTo4dTensor included,
    which cannot be built on a CPU) is a quantized base: the op never hands one to a dense kernel."""
    from torchao.utils import TorchAOBaseTensor

    from lsr_compile.quantized import DENSE, FORMATS, format_of_class

    seen, todo = set(), [TorchAOBaseTensor]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    assert len(seen) > 10
    formats = {cls.__name__: format_of_class(cls) for cls in seen}
    assert DENSE not in formats.values() and set(formats.values()) <= set(FORMATS)
    assert formats["Int4TilePackedTo4dTensor"] == "int4_weight_only" and formats["Int8Tensor"] == "int8_weight_only"
    assert format_of_class(torch.Tensor) == format_of_class(torch.nn.Parameter) == DENSE


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_under_autocast_the_base_runs_its_own_kernel_and_the_adapter_the_autocast_dtype(fmt, fresh_dispatch):
    """QLoRA-style training runs under autocast: the quantized base is never cast (that would hand it to a
    dense kernel), the adapter computes in bf16, and gradients reach the float32 factors."""
    layer = _quantized_layer(fmt)
    x = torch.randn(6, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
    fs = [p.detach().double() for p in (layer.A1, layer.A2, layer.B1, layer.B2)]
    want = base.double() + x.double() @ reference.delta_weight(*fs, layer.scale).T
    delta = want - base.double()
    assert ((y.double() - want).abs().max() / delta.abs().max()).item() < 3e-2  # bf16's rounding of the update
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in (layer.A1, layer.A2, layer.B1, layer.B2))
    ops = {op for op, _ in dispatch.cached_choices()}
    assert {"adapter_forward", "adapter_backward"} <= ops and "forward" not in ops


def test_no_full_precision_copy_of_the_base_per_call(monkeypatch):
    layer = _quantized_layer("int8_weight_only")
    cls = type(layer.weight)
    calls = []
    real = cls.dequantize
    monkeypatch.setattr(cls, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(16, 96, requires_grad=True)
    layer(x).sum().backward()
    assert calls == [] and type(layer.weight) is cls


def test_merging_into_a_quantized_base_refuses_clearly():
    layer = _quantized_layer("int8_weight_only")
    with pytest.raises(ValueError, match="int8_weight_only-quantized; merging"):
        layer.merge()
    with pytest.raises(ValueError, match="quantized"):
        layer.to_linear()


def test_peft_order_quantize_then_get_peft_model(fresh_dispatch):
    from peft import get_peft_model

    from models import tokens

    model = _int8_bert()
    pm = get_peft_model(model, lc.LSRConfig(s=2, r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                            init="reference", alpha=200.0))
    ids = tokens(2, 9)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lsr_" in n}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if "lsr_" in n)
    with pytest.raises(ValueError, match="quantized"):
        pm.merge_and_unload()


def test_mixed_batch_over_a_quantized_base_matches_each_sample_alone_and_trains_its_adapters(fresh_dispatch):
    from peft import get_peft_model

    from models import each_sample_alone, tokens

    model = _int8_bert()
    cfg = dict(target_modules=["query", "value"], task_type="SEQ_CLS", init="reference")
    pm = get_peft_model(model, lc.LSRConfig(s=2, r=2, **cfg))
    pm.add_adapter("b", lc.LSRConfig(s=3, r=(2, 4), **cfg))  # another factor structure
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lsr_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    ids = tokens(5, 9)
    names = ["b", "default", "__base__", "b", "default"]
    got = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, each_sample_alone(pm, ids, names), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the adapters really differ
    assert {op for op, _ in dispatch.cached_choices()} >= {"adapter_forward"}

    pm.train()
    for n, p in pm.named_parameters():
        p.requires_grad_("lsr_" in n)
    pm(input_ids=ids[:2], adapter_names=["b", "__base__"]).logits.square().sum().backward()
    for n, p in pm.named_parameters():
        if "lsr_" in n:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == n.endswith(".b"), n


@pytest.mark.parametrize("fmt", sorted(CONFIGS))
def test_adapter_bank_over_a_quantized_base_matches_each_sample_alone(fmt, monkeypatch):
    from lsr_compile.bank import BankedLinear

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64))
    quantize_(model, CONFIGS[fmt]())
    base = model[0]
    layer = BankedLinear(base, lc.LSRConfig(s=3, r=(2, 2)).shapes_for(96, 64), capacity=3)
    with torch.no_grad():
        for p in ("A1", "A2", "B1", "B2"):
            getattr(layer, p).normal_(0, 0.3)
        layer.scales.copy_(torch.tensor([0.5, 2.0, 1.5]))
    x = torch.randn(4, 5, 96)
    layer.slots = torch.tensor([2, -1, 0, 2])
    dequantized = []
    real = type(base.weight).dequantize
    monkeypatch.setattr(type(base.weight), "dequantize", lambda w, *a, **k: dequantized.append(1) or real(w, *a, **k))
    base(x)
    by_the_base_alone = len(dequantized)  # torchao's intx CPU kernel dequantizes by itself; int8's does not
    got = layer(x)
    assert len(dequantized) == 2 * by_the_base_alone  # the bank adds no dequantization of its own
    monkeypatch.undo()
    for i, k in enumerate(layer.slots.tolist()):
        want = base(x[i])
        if k >= 0:
            dW = reference.delta_weight(layer.A1[k], layer.A2[k], layer.B1[k], layer.B2[k], float(layer.scales[k]))
            want = want + x[i] @ dW.T
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4, msg=f"sample {i} (slot {k})")
    assert not torch.allclose(got[0], base(x[0]), atol=1e-3)  # the adapter really adds something


def test_the_base_format_is_part_of_the_tuning_key(tmp_path, fresh_dispatch):
    shape = lc.LSRShape(64, 96, 64, s=3, r=(2, 2), base="int8_weight_only")
    recs = lc.tune([shape], log_dir=tmp_path, trials=0, time_budget_s=30, progress=False)
    assert [(r["key"]["op"], r["key"]["base"]) for r in recs] == [("adapter_forward", "int8_weight_only"),
                                                                    ("adapter_backward", "int8_weight_only")]
    lc.load_logs(tmp_path)
    layer = _quantized_layer("int8_weight_only")
    layer(torch.randn(64, 96))
    chosen = [c for op, c in dispatch.cached_choices() if op == "adapter_forward"]
    assert chosen and chosen[0].reason.startswith("tuned:")


def test_tuning_a_model_over_a_quantized_base_tunes_the_ops_it_runs(tmp_path, fresh_dispatch):
    """``tune(model)`` and ``explain(layer)`` see the base's format: the adapter ops, keyed by it."""
    from peft import get_peft_model

    model = _int8_bert()
    pm = get_peft_model(model, lc.LSRConfig(s=2, r=2, target_modules=["query"], task_type="SEQ_CLS"))
    recs = lc.tune(pm, tokens=[32], log_dir=tmp_path, trials=0, time_budget_s=30, progress=False)
    assert {(r["key"]["op"], r["key"]["base"]) for r in recs} == {("adapter_forward", "int8_weight_only"),
                                                                   ("adapter_backward", "int8_weight_only")}
    layer = _quantized_layer("int8_weight_only")
    text = lc.explain(layer, tokens=64)
    assert ", base int8_weight_only" in text and "adapter_forward" in text and "\n  forward " not in text
    shape = layer.lsr_shape(64)
    assert lc.explain(shape, tokens=128) == lc.explain(dataclasses.replace(shape, tokens=128))


def test_compiles_without_graph_break():
    layer = _quantized_layer("int8_weight_only")
    x = torch.randn(8, 96)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), atol=1e-4, rtol=1e-4)


def test_bitsandbytes_4bit_base_on_the_cpu(fresh_dispatch):
    """bitsandbytes' NF4 Linear4bit runs on this CPU (0.50): its own forward serves the base."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = torch.nn.Linear(96, 64)
    lin = bnb.nn.Linear4bit(96, 64, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    lin.bias = torch.nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    layer = lc.LSRLinear.from_linear(lin, lc.LSRConfig(s=3, r=(2, 2)))
    with torch.no_grad():
        for p in (layer.A1, layer.A2, layer.B1, layer.B2):
            p.normal_(0, 0.3)  # the adapter's share and every factor's gradient far above the tolerances
    assert base_format(layer.weight) == "bnb_4bit"
    x = torch.randn(6, 96, requires_grad=True)
    y = layer(x)
    fs = [p.detach().clone().requires_grad_(True) for p in (layer.A1, layer.A2, layer.B1, layer.B2)]
    want = lin(x.detach()) + reference.lsr_linear(x.detach(), torch.zeros(64, 96), None, *fs, layer.scale)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(layer.A1.grad, fs[0].grad, atol=1e-5, rtol=1e-4)

    from lsr_compile.bank import BankedLinear  # a bank of adapters beside the same 4-bit base

    bank = BankedLinear(lin, lc.LSRConfig(s=3, r=(2, 2)).shapes_for(96, 64), capacity=2)
    assert bank.A1.dtype == torch.float32  # the base's compute dtype, not the packed weight's uint8
    with torch.no_grad():
        for p in ("A1", "A2", "B1", "B2"):
            getattr(bank, p).normal_(0, 0.3)
        bank.scales.copy_(torch.tensor([0.5, 2.0]))
    bank.slots = torch.tensor([1, -1])
    xb = torch.randn(2, 96)
    got = bank(xb)
    dW = reference.delta_weight(bank.A1[1], bank.A2[1], bank.B1[1], bank.B2[1], 2.0)
    torch.testing.assert_close(got, torch.stack([lin(xb[0]) + xb[0] @ dW.T, lin(xb[1])]), atol=1e-5, rtol=1e-5)


def test_benchmark_quick_run(tmp_path):
    from lsr_compile import bench_quantized

    rows = bench_quantized.run(tmp_path / "rows.jsonl", quick=True)
    by = {(r["format"], r["mode"]): r for r in rows}
    assert {"fp32", "bf16", "int8 (torchao)"} <= {f for f, _ in by}
    fp32, int8 = by[("fp32", "forward")], by[("int8 (torchao)", "forward")]
    assert fp32["base_bytes"] == 512 * 256 * 4 + 512 * 4
    assert 0.25 < int8["base_bytes"] / fp32["base_bytes"] < 0.3  # one byte per weight plus per-row scales
    assert by[("bf16", "forward")]["base_bytes"] == fp32["base_bytes"] // 2
    assert fp32["ratio_to_dense"] == 1.0 and all(r["p50_ms"] > 0 for r in rows)
    # the adapter beside each base against the float64 reference (bf16 activations: bf16's rounding)
    assert all(0 < r["adapter_rel_err"] < (3e-2 if r["activations"] == "bfloat16" else 1e-4) for r in rows)
    assert len(bench_quantized.table(rows).splitlines()) == 4 + len({f for f, _ in by})


def test_benchmark_against_a_bf16_base(tmp_path):
    """The GPU check's configuration (bf16 activations, ratios against the bf16 base), run on this CPU."""
    from lsr_compile import bench_quantized

    rows = bench_quantized.run(tmp_path / "rows.jsonl", quick=True, dtype=torch.bfloat16, budget_s=5)
    by = {(r["format"], r["mode"]): r for r in rows}
    assert rows[0]["format"] == "bf16" and {r["dense"] for r in rows} == {"bf16"}
    assert by[("bf16", "forward+backward")]["ratio_to_dense"] == 1.0
    assert ("int8 (torchao)", "forward") in by and by[("int8 (torchao)", "forward")]["activations"] == "bfloat16"
    assert "fp32" not in {f for f, _ in by}
    assert "vs bf16" in bench_quantized.table(rows)
