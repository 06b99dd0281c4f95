"""The one-command GPU check: every kernel against a float64 reference, the GPU shapes tuned, the side-by-side
table and a whole-model throughput line, in one run that ends within a fixed budget.

    bash examples/gpu_check.sh                          # on a GPU machine; writes everything to $OUT
    python -m lsr_compile.gpu_check --dry-run --out D   # the same code on a CPU: interpreter, tiny shapes (CI)

How it is sized: the run has a deadline (``--budget``, 330 s by default: a 15-minute GPU lease gives one
command about 6 minutes after the machine's start and a possible rerun). Each stage states how long it needs
and starts only if that fits before the deadline, else it is recorded as skipped; the shell wrapper kills the
process 30 s after the deadline. Rows go to ``gpu_check.jsonl`` as soon as they are measured and the tables
in ``gpu_check.md`` are rewritten after every stage, so a kill loses only the stage in flight.
Order: environment and ceilings, correctness, the target shape (bf16 4096², N = 8192) tuned and benchmarked,
the whole model, then the other GPU shapes while time is left.

Correctness failures (exit status 1) are kept apart from candidates skipped because something is not
available here (TVM missing, a config pruned for spilling): those are listed, never counted as failures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

SCALE = 0.7


class Run:
    """Deadline, output files and the failure / skip lists of one check."""

    def __init__(self, out: Path, budget_s: float, device: torch.device, dry: bool):
        self.out, self.device, self.dry = out, device, dry
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.rows: list[dict] = []
        self.meta: Optional[dict] = None
        out.mkdir(parents=True, exist_ok=True)
        self.rows_path = out / "gpu_check.jsonl"
        self.rows_path.write_text("")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, *a) -> None:
        print(f"[{self.elapsed():6.1f}s]", *a, flush=True)

    def row(self, kind: str, **fields) -> dict:
        from .bench import provenance, write_rows

        if self.meta is None:
            self.meta = provenance(self.device)
        r = {"kind": kind, **fields} | self.meta
        self.rows.append(r)
        write_rows(self.rows_path, [r], append=True)
        return r

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.row("failure", what=what)
        self.say("FAIL", what)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.row("skipped", what=what)
        self.say("skip", what)

    def stage(self, name: str, need_s: float, fn, *args) -> object:
        """Run ``fn`` if ``need_s`` fits before the deadline; a crash is a failure, never the end of the run."""
        if self.left() < need_s:
            self.skip(f"{name}: needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s left in the budget")
            return None
        started = time.perf_counter()
        self.say(f"{name} ...")
        try:
            return fn(*args)
        except Exception:
            self.fail(f"{name} crashed: {traceback.format_exc(limit=6)}")
            return None
        finally:
            self.row("stage", name=name, seconds=round(time.perf_counter() - started, 1))
            self.say(f"{name} done in {time.perf_counter() - started:.1f} s")
            self.write_tables()

    def write_tables(self) -> None:
        from . import bench
        from .demo import throughput_table

        parts = [f"# GPU check on {self.env_line()}\n"]
        bench_rows = [r for r in self.rows if r["kind"] == "bench"]
        if bench_rows:
            parts += ["## Layer: ratios of medians, measured side by side\n", bench.table(bench_rows), ""]
        tune_rows = [r for r in self.rows if r["kind"] == "tune"]
        if tune_rows:
            parts += ["## Tuning winners\n"] + [f"- {r['summary']}" for r in tune_rows] + [""]
        model_rows = [r for r in self.rows if r["kind"] == "model"]
        if model_rows:
            parts += [f"## Whole model: {model_rows[0]['name']}\n", throughput_table(model_rows), ""]
        mixed_rows = [r for r in self.rows if r["kind"] == "mixed"]
        if mixed_rows:
            from .bench_mixed import table as mixed_table

            parts += ["## Many adapters in one batch (forward)\n", mixed_table(mixed_rows), ""]
        quantized_rows = [r for r in self.rows if r["kind"] == "quantized"]
        if quantized_rows:
            from .bench_quantized import table as quantized_table

            parts += ["## A quantized frozen base (bf16 activations)\n", quantized_table(quantized_rows), ""]
        over = next((r["us_per_call"] for r in self.rows if r["kind"] == "overhead"), None)
        if over:
            parts += ["## Host µs per eager call (8 tokens, 16x16)\n",
                      "| " + " | ".join(over) + " |", "|---" * len(over) + "|",
                      "| " + " | ".join(f"{v:.1f}" for v in over.values()) + " |", ""]
        parts += [f"## Correctness failures: {len(self.failures)}\n"] + [f"- {f}" for f in self.failures] + [""]
        parts += [f"## Skipped (not available here, pruned, or out of time): {len(self.skipped)}\n"]
        reasons: dict[str, list[str]] = {}
        for what in self.skipped:
            head, _, why = what.rpartition(": ")
            reasons.setdefault(why, []).append(head)
        parts += [f"- {why} ({len(heads)}): " + "; ".join(heads[:3]) + (" ..." if len(heads) > 3 else "")
                  for why, heads in reasons.items()]
        (self.out / "gpu_check.md").write_text("\n".join(parts) + "\n")

    def env_line(self) -> str:
        env = next((r for r in self.rows if r["kind"] == "env"), {})
        return f"{env.get('device_name', '?')} ({env.get('device_id', '?')}), versions {env.get('versions', {})}"


# ---- stages ---------------------------------------------------------------------------------------

def stage_env(run: Run) -> None:
    from . import logs
    from .device import device_id, device_info

    dev = run.device
    info = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device_info(dev)["model"],
            "device_id": device_id(dev), "device_info": device_info(dev), "versions": logs.library_versions(),
            "python": sys.version.split()[0], "dry_run": run.dry}
    info["tvm"] = tvm_status(dev)
    if dev.type == "cuda":
        info |= ceilings(dev)
    run.row("env", **info)
    run.say(json.dumps(info, default=str))


def tvm_status(dev) -> str:
    """TVM here: compiler and runtime, runtime alone (then only prebuilt artifacts run), or none."""
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        return "not installed: TVM candidates are skipped"
    import tvm.base

    from .kernels import tvm_cuda

    kind = "runtime only" if tvm.base._RUNTIME_ONLY else "compiler and runtime"
    if dev.type != "cuda":
        return f"{tvm.__version__}, {kind}"
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability(dev))
    return (f"{tvm.__version__}, {kind}; {len(tvm_cuda.index(arch))} prebuilt {arch} artifacts in "
            f"{tvm_cuda.artifact_dir() / arch}")


def ceilings(dev) -> dict:
    """The two numbers every ratio is read against: a large bf16 GEMM's rate and a device copy's bandwidth."""
    from .tuning.timing import measure, median

    n = 8192
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(256 * 2**20, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    t = measure({"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, dev, warmup=3, rounds=10)
    gemm_ms, copy_ms = median(t["gemm"]), median(t["copy"])
    return {"bf16_gemm_tflops": round(2 * n**3 / gemm_ms / 1e9, 1),
            "copy_tb_s": round(2 * src.numel() * 4 / copy_ms / 1e9, 2)}


def check_dims(dry: bool) -> list[tuple]:
    """(s, r1, r2, n1, n2, m1, m2): ragged everywhere, rectangular, and (on a GPU) a 768² layer."""
    dims = [(3, 2, 3, 6, 7, 5, 9), (2, 2, 4, 8, 8, 4, 8)]
    return dims if dry else dims + [(4, 2, 4, 32, 24, 32, 24)]


def stage_correctness(run: Run) -> None:
    """Every kernel (PyTorch formulations, Triton, TVM) on fresh random inputs against the float64
    reference, values and gradients; outputs are poisoned with NaN before each call."""
    from . import kernels
    from .config import FactorShapes
    from .problem import ProblemKey
    from .tuning.harness import TOL

    dev = run.device
    dtypes = [torch.float64, torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    N = 37 if run.dry else 301
    ok = 0
    for dims in check_dims(run.dry):
        for dtype in dtypes:
            dt = str(dtype).removeprefix("torch.")
            tol = TOL[dt]
            for op in ("forward", "backward"):
                key = ProblemKey.of(op, dtype, N, FactorShapes(*dims))
                cands = correctness_candidates(op, key, dev, every_point=dims == check_dims(run.dry)[-1])
                for backend, variant, cfg in cands:
                    name = f"{op} {backend}:{variant} {cfg} dims={dims} {dt}"
                    why_not = kernels.unavailable(backend, dev)  # a config that spills is still checked
                    if why_not is not None:
                        run.skip(f"{name}: {why_not}")
                        continue
                    try:
                        fn = kernels.build(backend, op, variant, cfg, key, dev)
                        err = _max_error(op, fn, dims, N, dtype, dev)
                    except Exception as e:
                        run.fail(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                        continue
                    if not err <= tol:  # NaN fails too
                        run.fail(f"{name}: relative error {err:.3g} > {tol}")
                    else:
                        ok += 1
    run.row("correctness", passed=ok, failed=len(run.failures))
    run.say(f"correctness: {ok} kernel checks passed")


def correctness_candidates(op, key, dev, every_point: bool) -> list[tuple[str, str, dict]]:
    """Every PyTorch formulation, each TVM expression at its default schedule, Triton at the dtype's default
    (on a GPU in bf16 with ``every_point``: every point of its space, as tuning would run them)."""
    from . import kernels, schedule_spaces
    from .device import space_name, target_of

    out = [("torch", v, {}) for v in sorted(kernels.torch_formulations(op))]
    space = space_name("tvm", target_of(dev))
    if key.dtype in schedule_spaces.dtypes(space):
        out += [("tvm", v, schedule_spaces.default(space, op, v)) for v in schedule_spaces.variants(space, op)]
    from .kernels import triton_fused, triton_parts

    if dev.type == "cuda" and key.dtype == "bfloat16" and every_point:
        return out + triton_parts.candidates(op, key) + triton_fused.candidates(op, key)
    return out + [("triton", v, triton_parts.default_config(op, v, key, dev)) for v in triton_parts.VARIANTS] + [
        ("triton", "fused", triton_fused.default_choice(op, key, dev)[1])]


def _max_error(op, fn, dims, N, dtype, dev) -> float:
    """The largest relative error over the outputs, on fresh inputs, with NaN-poisoned output memory."""
    from .problem import LSRShape
    from .tuning import harness

    s, r1, r2, n1, n2, m1, m2 = dims
    shape = LSRShape(N, n1 * n2, m1 * m2, s, (r1, r2), (n1, n2), (m1, m2), dtype)
    d = harness.inputs(shape, N, dev, dtype)
    want = harness.expected(op, d, SCALE)
    poison([tuple(w.shape) for w in want], dtype, dev)
    return max(harness.errors(op, harness.call(op, fn, d, SCALE)(), want))


def poison(shapes, dtype, dev) -> None:
    """Fill memory the caching allocator will hand out next with NaN, so an output element a kernel never
    writes shows up as NaN instead of a stale right answer."""
    junk = [torch.full(sh, math.nan, dtype=dtype, device=dev) for sh in shapes]
    del junk


def stage_overhead(run: Run) -> None:
    """Host µs per eager call at a tiny layer: what bounds every small problem on a GPU."""
    from .bench import dispatch_overhead

    over = dispatch_overhead(calls=200 if run.dry else 2000, device=run.device)
    run.row("overhead", us_per_call={k: round(v, 1) for k, v in over.items()})
    run.say("host µs per eager call (8x16x16): " + ", ".join(f"{k} {v:.1f}" for k, v in over.items()))


def stage_compiled(run: Run) -> None:
    """torch.compile(fullgraph=True) of an LSR layer, per backend: values and gradients against float64."""
    from . import reference
    from .config import LSRConfig
    from .dispatch import use_backend
    from .kernels import unavailable
    from .nn import LSRLinear

    dev = run.device
    dtype, tol = (torch.bfloat16, 4e-2) if dev.type == "cuda" else (torch.float32, 1e-4)
    d = 64 if run.dry else 768
    for backend in (None, "torch", "triton"):
        label = f"compiled layer ({backend or 'dispatch'}) {d}x{d} {str(dtype)[6:]}"
        why_not = backend and unavailable(backend, dev)
        if why_not:
            run.skip(f"{label}: {why_not}")
            continue
        torch._dynamo.reset()
        layer = LSRLinear(d, d, config=LSRConfig(s=4, r=(2, 4), init="reference")).to(dev, dtype)
        x = torch.randn(4, 32 if run.dry else 128, d, device=dev, dtype=dtype, requires_grad=True)
        try:
            with use_backend(backend):
                y = torch.compile(layer, fullgraph=True)(x)
                y.float().square().sum().backward()
            params = [x] + [getattr(layer, n) for n in ("A1", "A2", "B1", "B2")]
            got = [y] + [p.grad for p in params]
            ref_in = [p.detach().double().requires_grad_(True) for p in params]
            want_y = reference.lsr_linear(ref_in[0], layer.weight.double(), layer.bias.double(), *ref_in[1:],
                                              layer.scale)
            want_y.square().sum().backward()
            for name, o, w in zip(("y", "dx", "dA1", "dA2", "dB1", "dB2"), got, [want_y] + [p.grad for p in ref_in]):
                err = (o.double() - w).abs().max().item() / max(1.0, w.abs().max().item())
                if not err <= tol:
                    run.fail(f"{label}: {name} relative error {err:.3g} > {tol}")
                    break
            else:
                run.say(f"{label}: values and gradients ok")
        except Exception as e:
            run.fail(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


def stage_shape(run: Run, shape, target: str, tune_s: float, bench_s: float, log_dir) -> None:
    """Tune one shape (both ops), then benchmark it against the floor and the peers."""
    from . import bench
    from .tuning import tune
    from .tuning.search import summary

    recs = tune([shape], target=target, log_dir=log_dir, time_budget_s=tune_s, progress=False)
    for rec in recs:
        run.row("tune", shape=shape.label(), summary=summary(rec), record=rec)
        run.say("tuned", summary(rec))
        for name, why in rec["rejected"].items():
            run.fail(f"tune {rec['key']['op']} {shape.label()}: {name} rejected: {why}")
        out_of_time = [n for n, why in rec["skipped"].items() if why == "time budget"]
        for name, why in rec["skipped"].items():
            if why != "time budget":
                run.skip(f"tune {rec['key']['op']} {shape.label()}: {name}: {why}")
        if out_of_time:
            run.skip(f"tune {rec['key']['op']} {shape.label()}: {len(out_of_time)} candidates past the time budget")
    if len(recs) < 2:
        run.fail(f"tune {shape.label()}: no correct candidate for {2 - len(recs)} op(s)")
    copy_logs(run, log_dir, target)
    rows = bench.bench_shape(shape, device=run.device, rounds=10 if run.dry else 20, budget_s=bench_s / 2)
    for r in rows:
        run.row("bench", **r)
    by = {(r["mode"], r["provider"]): r["p50_ms"] for r in rows}
    for mode in ("forward", "forward+backward"):
        run.say(f"{shape.label()} {mode}: LSR/floor {by[mode, 'lsr'] / by[mode, 'floor']:.3f}, "
                f"compiled/floor {by[mode, 'lsr_compiled'] / by[mode, 'floor']:.3f}, "
                f"LoRA/LSR {by[mode, 'lora'] / by[mode, 'lsr']:.3f}, "
                f"peft LoKr/LSR {by[mode, 'peft_lokr'] / by[mode, 'lsr']:.3f}")


def copy_logs(run: Run, log_dir, target: str) -> None:
    from . import logs
    from .device import device_id

    folder = logs.log_path(log_dir, target, device_id(run.device), "forward").parent
    for p in sorted(folder.glob("*.jsonl")):
        shutil.copy(p, run.out / f"tuning-{p.name}")


def stage_mixed(run: Run, d: int, cases: list) -> None:
    """Many adapters in one batch: the mixed LSR op against one adapter, looping over adapters and peft LoRA's
    mixed batch (lsr_compile.bench_mixed), at the GPU mixed shapes (bf16, N = 8192, K up to 512)."""
    from . import bench_mixed

    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    for K, dist, requests, per in cases:
        rows = bench_mixed.bench_case(d, K, dist, requests, per, device=run.device, dtype=dtype,
                                      rounds=5 if run.dry else 10, budget_s=5 if run.dry else 15)
        for r in rows:
            run.row("mixed", **r)
        by = {r["provider"]: r for r in rows}
        run.say(f"mixed K={K} {dist}: LSR mixed / one adapter {by['lsr mixed']['ratio_to_one_adapter']:.3f}, "
                f"peft LoRA mixed / LSR mixed {by['peft lora mixed']['p50_ms'] / by['lsr mixed']['p50_ms']:.3f}, "
                f"loop / LSR mixed {by['lsr loop']['p50_ms'] / by['lsr mixed']['p50_ms']:.3f}")


def stage_quantized(run: Run, d_in: int, d_out: int, token_counts: list) -> None:
    """A quantized frozen base under an LSR adapter (lsr_compile.bench_quantized): bf16 activations, torchao
    int8 and int4 weight-only bases against the bf16 base, forward and forward+backward, memory per format."""
    import importlib.util

    from . import bench_quantized
    from .tuning.harness import TOL

    if importlib.util.find_spec("torchao") is None:
        run.skip("quantized base: torchao is not installed (make gpu-artifacts puts its wheel in .whl/)")
    for tokens in token_counts:
        left_out: list[str] = []
        rows = bench_quantized.run(None, d_in=d_in, d_out=d_out, tokens=tokens,
                                   device=run.device, dtype=torch.bfloat16, budget_s=5 if run.dry else 12,
                                   left_out=left_out)
        for what in left_out:
            run.skip(f"quantized base, {tokens} tokens, {what.replace(': ', ' - ', 1)}: does not run here")
        for r in rows:
            run.row("quantized", **{k: v for k, v in r.items() if k not in (run.meta or {})})
        tol = TOL[rows[0]["activations"]] if rows else 0.0
        for name, err in {r["format"]: r["adapter_rel_err"] for r in rows}.items():
            if not math.isfinite(err) or err > tol:
                run.fail(f"quantized base {name}, {tokens} tokens: the adapter beside it is off by {err:.3g} "
                         f"(relative to max |x·ΔWᵀ|, float64 reference; tolerance {tol})")
        run.say(f"quantized base, {tokens} tokens: " + ", ".join(
            f"{r['format']} {r['mode']} {r['ratio_to_dense']:.2f}" for r in rows if r["format"] != r["dense"]))


def stage_model(run: Run, hidden: int, layers: int, batch: int, seq: int) -> None:
    """Tokens/s of a BERT encoder with LSR on query/key/value/attention-output: frozen base, reference eager,
    autotuned eager and compiled (the layer shapes are those tuned above: hidden², N = batch·seq)."""
    from .config import LSRConfig
    from .demo import bert_encoder, model_variants, throughput

    torch._dynamo.reset()
    dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
    base = bert_encoder(hidden, layers).to(run.device, dtype)
    models = model_variants(base, LSRConfig(s=4, r=(2, 4), init="reference"))
    ids = torch.randint(1000, 20000, (batch, seq), device=run.device)
    name = f"BERT {layers} layers x {hidden} (random weights), {str(dtype)[6:]}, batch {batch} x seq {seq}"
    for r in throughput(models, ids, rounds=(5, 4) if run.dry else (15, 10)):
        run.row("model", name=name, **r)


# ---- the run ----------------------------------------------------------------------------------------

def plan(dry: bool):
    """(shape, tune seconds, bench seconds) in the order they run, the model's size, the mixed-batch cases
    (layer width, [(K, distribution, requests, tokens per request)]) and the quantized-base layer (d_in, d_out,
    token counts: decoding, a training batch); the model, the mixed batch and the quantized base run once the
    shapes the model's layers use (the first two) are tuned."""
    from . import workloads

    if dry:
        return ([(s, 30.0, 30.0) for s in workloads.dry_run_shapes()], dict(hidden=64, layers=1, batch=2, seq=32),
                (64, [(K, "uniform", 4, 8) for K in (1, 8)]), (256, 512, [8, 32]))
    shapes = workloads.gpu_shapes()
    mixed = [(s.adapters, dist, s.num_segments, s.tokens // s.num_segments) for s in workloads.gpu_mixed_shapes()
             for dist in ("uniform", "skewed")]
    return ([(shapes[0], 60.0, 60.0)] + [(s, 25.0, 45.0) for s in shapes[1:]],
            dict(hidden=768, layers=4, batch=32, seq=256), (4096, mixed), (4096, 11008, [16, 4096]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lsr_compile.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "results/gpu"))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check (default 330)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the same stages on this machine's CPU with tiny shapes (CI: the check's own test)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="tuning-log directory (default: OUT/logs)")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("no GPU visible; use --dry-run to run the check's code on this CPU", flush=True)
        return 2
    device = torch.device("cuda" if not a.dry_run else "cpu")
    run = Run(a.out, a.budget, device, a.dry_run)
    target = "cuda" if device.type == "cuda" else "llvm"
    log_dir = a.log_dir or a.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    from .dispatch import load_logs

    load_logs(log_dir)  # what the shape stages tune is what their benchmarks run
    torch.manual_seed(0)
    run.stage("environment", 0, stage_env, run)
    run.stage("correctness", 20 if a.dry_run else 60, stage_correctness, run)
    run.stage("compiled layer", 10 if a.dry_run else 45, stage_compiled, run)
    run.stage("host overhead", 5, stage_overhead, run)
    shapes, model, mixed, quantized = plan(a.dry_run)
    for i, (shape, tune_s, bench_s) in enumerate(shapes):
        run.stage(f"shape {shape.label()}", tune_s + bench_s, stage_shape, run, shape, target, tune_s, bench_s,
                  log_dir)
        if i == min(1, len(shapes) - 1):
            run.stage("whole model", 30 if a.dry_run else 120, stage_model, run, *model.values())
            run.stage("mixed batch", 20 if a.dry_run else 90, stage_mixed, run, *mixed)
            run.stage("quantized base", 20 if a.dry_run else 60, stage_quantized, run, *quantized)
    run.write_tables()
    print((a.out / "gpu_check.md").read_text(), flush=True)
    run.say(f"done: {len(run.failures)} correctness failures, {len(run.skipped)} skipped; files in {a.out}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
