"""Fuzz: tuning-log lines (valid, corrupt, hostile) never make a layer call raise, hang, or return anything
but the reference's result. A line that is not a valid record is skipped with a TuningLogWarning."""
import json
import math
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsr_compile as lc
from lsr_compile import dispatch, logs, schedule_spaces
from lsr_compile.device import device_id
from lsr_compile.problem import ProblemKey
from lsr_compile.quantized import FORMATS

from models import strong_adapters

SHAPE = lc.LSRShape(24, 16, 12, s=2, r=2, n=(4, 4), m=(4, 3))
DEV = device_id("cpu")

junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
                    st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _valid(op):
    backend_variants = [("torch", "materialise", {}), ("torch", "fold", {})]
    for variant in schedule_spaces.variants("llvm", op):
        backend_variants += [("tvm", variant, c) for c in schedule_spaces.space("llvm", op, variant)[:2]]
    return st.sampled_from(backend_variants).map(lambda bvc: {
        "schema": logs.SCHEMA, "device": {"id": DEV}, "versions": logs.library_versions(),
        "key": SHAPE.key(op).as_dict(), "backend": bvc[0], "variant": bvc[1], "config": dict(bvc[2]),
        "time_ms": 0.5})


@st.composite
def mutated(draw, op):
    rec = draw(_valid(op))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["top", "key", "config"]))
        target = rec if where == "top" else rec.setdefault(where, {})
        if not isinstance(target, dict):
            break
        field = draw(st.sampled_from(sorted(target) + ["extra"]) if target else st.just("extra"))
        target[field] = draw(junk | st.sampled_from([10**12, -1, 0, 2.5, float("inf"), "fused", "triton"]))
    return rec


@st.composite
def line(draw, op):
    kind = draw(st.sampled_from(["valid", "mutated", "bytes", "json"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80)).replace(b"\n", b" ")
    if kind == "json":
        return json.dumps(draw(junk), allow_nan=True).encode()
    rec = draw(_valid(op)) if kind == "valid" else draw(mutated(op))
    return json.dumps(rec, allow_nan=True).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(fwd=st.lists(line("forward"), max_size=5), bwd=st.lists(line("backward"), max_size=5))
def test_no_log_line_takes_a_layer_down(time_limit, fwd, bwd):
    layer = strong_adapters(lc.LSRLinear(16, 12, config=lc.LSRConfig(s=2, r=2, n=(4, 4), m=(4, 3))))
    x = torch.randn(SHAPE.tokens, 16, requires_grad=True)
    with tempfile.TemporaryDirectory() as d, time_limit(120):
        for op, lines in (("forward", fwd), ("backward", bwd)):
            path = logs.log_path(Path(d), "llvm", DEV, op)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lc.load_logs(d)
                y = layer(x)
                y.square().sum().backward()
        finally:
            dispatch.reset()
    xr = x.detach().clone().requires_grad_(True)
    want = lc.reference.lsr_linear(xr, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2,
                                   layer.scale)
    want.square().sum().backward()
    assert (want - torch.nn.functional.linear(xr, layer.weight, layer.bias)).abs().max() > 100 * 1e-5
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)


@settings(max_examples=80, deadline=None)
@given(rec=mutated("forward"))
def test_a_record_is_either_valid_or_skipped_with_a_warning_naming_file_and_line(rec):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "forward.jsonl"
        path.write_text(json.dumps(rec, allow_nan=True) + "\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = logs.read([path], DEV, "llvm")
    if got:
        (r,) = got.values()
        assert r.backend in ("torch", "tvm") and math.isfinite(r.time_ms) and r.time_ms > 0
        assert all(type(v) is int and v >= 1 for k, v in r.key.as_dict().items() if k not in ("op", "dtype", "base"))
        assert r.key.base in FORMATS
        assert r.config == {} if r.backend == "torch" else r.config in schedule_spaces.space("llvm", "forward", r.variant)
    else:
        assert any(issubclass(w.category, logs.TuningLogWarning) and "forward.jsonl" in str(w.message)
                   for w in caught)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line("forward"), max_size=5), terminated=st.booleans(), appends=st.integers(1, 3))
def test_an_append_never_loses_a_record(lines, terminated, appends):
    """Whatever the file holds, ending in a newline or not (a hand edit, a write cut short): every record
    appended is read back, and so is every record that was valid before (an unterminated last line too)."""
    with tempfile.TemporaryDirectory() as d:
        path = logs.log_path(Path(d), "llvm", DEV, "forward")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\n".join(lines) + (b"\n" if terminated and lines else b""))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = set(logs.read([path], DEV, "llvm"))
            added = []
            for i in range(appends):
                rec = {"schema": logs.SCHEMA, "device": {"id": DEV}, "versions": logs.library_versions(),
                       "key": lc.LSRShape(2048 << i, 16, 12, s=2, r=2, n=(4, 4), m=(4, 3)).key("forward").as_dict(),
                       "backend": "torch", "variant": "fold", "config": {}, "time_ms": 0.5}
                logs.append(path, rec)
                added.append(ProblemKey(**rec["key"]))
            after = logs.read([path], DEV, "llvm")
    assert before | set(added) <= set(after)
