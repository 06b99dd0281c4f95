"""One-call GPU check (issue 4): correctness of every kernel in float64 (and bf16), tuning of the GPU shapes,
and the SPEC §4 GPU ratio table — in one run sized to finish in under 8 minutes on an H100/H200.

    python3 -m lsr_compile.gpu_check --out DIR [--budget SECONDS]

Writes DIR/gpu_check.jsonl (benchmark rows), DIR/gpu_check.md (the table) and the tuning log under
tuning_logs/cuda/<gpu>/ (copied to DIR too). Needs PyTorch, Triton and peft, as on the GPU image;
TVM is optional there (its CUDA candidates are reported as failed builds when it is missing).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch


def _print(*a):
    print(*a, flush=True)


def check_kernels() -> list[str]:
    """Every kernel against the float64 reference on ragged shapes; returns failures."""
    from . import formulations, reference, schedules
    from .kernels import build
    from .problem import ProblemKey, token_bucket

    dev = torch.device("cuda")
    failures = []
    for dims in [(3, 2, 3, 6, 7, 5, 9), (4, 2, 4, 32, 24, 32, 24), (2, 4, 4, 64, 64, 64, 64)]:
        for dtype, tol in [(torch.float64, 1e-9), (torch.bfloat16, 4e-2)]:
            N = 301
            d_in, d_out = dims[3] * dims[4], dims[5] * dims[6]
            x = torch.randn(N, d_in, dtype=torch.float64, device=dev)
            W = torch.randn(d_out, d_in, dtype=torch.float64, device=dev) / d_in ** 0.5
            b = torch.randn(d_out, dtype=torch.float64, device=dev)
            fs = [torch.randn(s, dtype=torch.float64, device=dev) * 0.3 for s in
                  [(dims[0], dims[1], dims[3]), (dims[0], dims[2], dims[4]), (dims[0], dims[5], dims[1]),
                   (dims[0], dims[6], dims[2])]]
            g = torch.randn(N, d_out, dtype=torch.float64, device=dev)
            xr = x.clone().requires_grad_(True)
            fr = [f.clone().requires_grad_(True) for f in fs]
            y_ref = reference.lsr_linear(xr, W, b, *fr, 0.7)
            y_ref.backward(g)
            want_b = [xr.grad] + [f.grad for f in fr]
            cast = lambda t, dtype=dtype: t.to(dtype)  # noqa: E731
            for op in ("forward", "backward"):
                key = ProblemKey(op, str(dtype)[6:], token_bucket(N), *dims)
                cands = [("torch", v, {}) for v in (formulations.FORWARDS if op == "forward"
                                                     else formulations.BACKWARDS)]
                cands += [("triton", "fused", c) for c in schedules.space("triton_cuda", op, "fused")[:2]]
                if dtype == torch.float64:
                    cands += [("tvm", v, schedules.default("cuda", op, v)) for v in schedules.variants("cuda", op)]
                for backend, variant, cfg in cands:
                    name = f"{op} {backend}:{variant} {cfg} {dims} {dtype}"
                    try:
                        fn = build(backend, op, variant, cfg, key, dev)
                        if op == "forward":
                            got = [fn(cast(x), cast(W), cast(b), *map(cast, fs), 0.7)]
                            want = [y_ref.detach()]
                        else:
                            got = list(fn(cast(g), cast(x), cast(W), *map(cast, fs), 0.7, True))
                            want = want_b
                        for o, w in zip(got, want):
                            err = (o.double() - w).abs().max().item() / max(1.0, w.abs().max().item())
                            if not err <= tol:
                                raise AssertionError(f"relative error {err:.3g} > {tol}")
                    except Exception as e:
                        failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return failures


def check_compiled() -> list[str]:
    """torch.compile(fullgraph) of a layer on the Inductor-visible Triton op: values and gradients."""
    import lsr_compile as lc

    failures = []
    layer = lc.LSRLinear(768, 768, config=lc.LSRConfig(s=4, r=(2, 4), init="reference")).cuda().to(torch.bfloat16)
    x = torch.randn(4, 128, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with lc.use_backend("triton"):
        try:
            compiled = torch.compile(layer, fullgraph=True)
            y = compiled(x)
            y.float().square().sum().backward()
            want = lc.reference.lsr_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                           *[p.double() for p in (layer.A1, layer.A2, layer.B1, layer.B2)],
                                           layer.scale)
            err = (y.double() - want).abs().max().item() / want.abs().max().item()
            if err > 4e-2:
                failures.append(f"compiled triton_op layer: relative error {err:.3g}")
            if layer.A1.grad is None or not torch.isfinite(layer.A1.grad).all():
                failures.append("compiled triton_op layer: no/invalid gradient for A1")
        except Exception as e:
            failures.append(f"compiled triton_op layer: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--budget", type=float, default=200.0, help="tuning seconds for all GPU shapes")
    ap.add_argument("--trials", type=int, default=4)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        _print("no GPU visible: nothing to check here (the CPU suite covers the interpreter path)")
        return 2
    import lsr_compile as lc
    from . import bench, logs, workloads
    from .tuning.device import device_id
    from .tuning.search import summary

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _print(f"GPU {torch.cuda.get_device_name()} ({device_id('cuda')}), torch {torch.__version__}, "
           f"versions {logs.library_versions()}")
    failures = []
    for step in (check_kernels, check_compiled):
        try:
            f = step()
        except Exception:
            f = [f"{step.__name__} crashed:\n{traceback.format_exc()}"]
        failures += f
        _print(f"{step.__name__}: {len(f)} failures ({time.time() - t0:.0f} s)")
        for line in f:
            _print("  FAIL", line)
    recs = lc.tune(workloads.gpu_shapes(), target="cuda", trials=a.trials, time_budget_s=a.budget, progress=False)
    _print(f"tuned {len(recs)} records in {time.time() - t0:.0f} s")
    for r in recs:
        _print("  " + summary(r))
    log_dir = logs.log_path(logs.PROJECT_LOG_DIR, "cuda", device_id("cuda"), "forward").parent
    if log_dir.exists():
        for p in log_dir.glob("*.jsonl"):
            shutil.copy(p, a.out / f"tuning-{p.name}")
    rows = []
    for shape in workloads.gpu_shapes():
        rows += bench.bench_shape(shape, device="cuda", rounds=20, budget_s=15)
        _print(f"bench {shape.label()} done ({time.time() - t0:.0f} s)")
    with open(a.out / "gpu_check.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r | {"device": device_id("cuda")}) + "\n")
    table = bench.table(rows)
    (a.out / "gpu_check.md").write_text(table + "\n")
    _print(table)
    _print(f"done in {time.time() - t0:.0f} s; {len(failures)} correctness failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
