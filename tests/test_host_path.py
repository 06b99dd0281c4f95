"""The eager host path of a training step: no more host time than a plain LoRA module (measured side by side
on this CPU at a tiny layer, where the host's work is all there is), arguments checked once per signature,
the dispatcher skipped for plain tensors but not where something must see the op."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lsr_compile as lc
from lsr_compile import bench, ops

from models import adapter_share, strong_adapters


def test_eager_training_step_costs_the_host_no_more_than_plain_lora():
    r = bench.host_step_us(rounds=7, steps=300)
    assert r["lsr / lora"] <= 1.0, r
    assert r["frozen Linear"] < r["LSRLinear module"]  # the measure can tell calls apart


def test_arguments_are_checked_once_per_signature(monkeypatch, fresh_dispatch):
    layer = lc.LSRLinear(12, 10, config=lc.LSRConfig(s=2, r=2))
    checks = []
    real = ops.check_args
    monkeypatch.setattr(ops, "check_args", lambda *a: checks.append(1) or real(*a))
    x = torch.randn(5, 12, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    assert len(checks) == 1
    layer(torch.randn(7, 3, 12, requires_grad=True)).sum().backward()  # another token bucket: a new lookup, checked
    assert len(checks) == 2
    bad = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    try:
        layer(bad)
    except ops.LSRInputError as e:
        assert "dtype mismatch" in str(e)
    else:
        raise AssertionError("a call with a new signature was not checked")


def test_a_dispatch_mode_sees_the_op_and_plain_calls_do_not_need_it():
    with torch.no_grad():
        layer = strong_adapters(lc.LSRLinear(12, 10, config=lc.LSRConfig(s=2, r=2)))
    x = torch.randn(5, 12, requires_grad=True)

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen():
        y = layer(x)
        y.sum().backward()
    assert "lsr.linear_forward.default" in Seen.ops and "lsr.linear_backward.default" in Seen.ops
    want = lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5
    torch.testing.assert_close(layer(x), want)  # the direct path computes the same
