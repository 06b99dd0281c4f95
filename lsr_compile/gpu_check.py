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
            predicted = {(r["shape"], r["mode"]): r["lsr_over_floor"] for r in self.rows if r["kind"] == "predicted"}
            parts += ["## Layer: ratios of medians, measured side by side (predicted: the cost model's LSR/floor)\n",
                      bench.table(bench_rows, predicted), ""]
        if (self.out / "profile.md").exists():
            parts += ["## One training step, profiled: see profile.md\n"]
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
    from .device import capability as device_capability
    from .problem import ProblemKey
    from .tuning.harness import TOL

    dev = run.device
    dtypes = [torch.float64, torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    N = 37 if run.dry else 301
    capability = device_capability(dev)
    ok = 0
    for dims in check_dims(run.dry):
        for dtype in dtypes:
            dt = str(dtype).removeprefix("torch.")
            tol = TOL[dt]
            for op in ("forward", "backward"):
                key = ProblemKey.of(op, dtype, N, FactorShapes(*dims))
                cands = correctness_candidates(op, key, dev, dims == check_dims(run.dry)[-1], capability)
                # what cannot run here (spills, shared memory over this GPU's limit) is skipped as the tuner
                # skips it, never run into OutOfResources
                cands, pruned = kernels.prune(cands, op, key, dev)
                for name, why in pruned.items():
                    run.skip(f"{op} {name} dims={dims} {dt}: pruned: {why}")
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
    if run.dry:
        prune_for_the_gpu(run, H200_CAPABILITY)


H200_CAPABILITY = 90


def correctness_candidates(op, key, dev, every_point: bool, capability: Optional[int] = None
                           ) -> list[tuple[str, str, dict]]:
    """Every PyTorch formulation, each TVM expression at its default schedule, Triton at the dtype's default
    (on a ``sm_<capability>`` GPU: the first point that fits the problem there, and in bf16 with
    ``every_point`` every point of its space, as tuning would run them; ``kernels.prune`` then drops what
    cannot run there)."""
    from . import kernels, schedule_spaces
    from .device import space_name, target_of

    gpu = capability is not None
    out = [("torch", v, {}) for v in sorted(kernels.torch_formulations(op))]
    space = space_name("tvm", "cuda" if gpu else target_of(dev))
    if key.dtype in schedule_spaces.dtypes(space):
        out += [("tvm", v, schedule_spaces.default(space, op, v)) for v in schedule_spaces.variants(space, op)]
    from .kernels import triton_fused, triton_parts

    if gpu and key.dtype == "bfloat16" and every_point:
        return out + triton_parts.candidates(op, key) + triton_fused.candidates(op, key)
    if gpu:
        return out + [("triton", v, triton_parts.fitting_config(op, v, key, capability))
                      for v in triton_parts.VARIANTS] + [("triton", "fused", triton_fused.fitting_default(op, key,
                                                                                                        capability))]
    return out + [("triton", v, triton_parts.default_config(op, v, key, dev)) for v in triton_parts.VARIANTS] + [
        ("triton", "fused", triton_fused.default_choice(op, key, dev)[1])]


def prune_for_the_gpu(run: Run, capability: int) -> None:
    """The dry run's share of the GPU's correctness stage: the Triton configs that stage runs on a
    ``sm_<capability>`` GPU (the GPU run's shapes: every point in bf16 at 768², the dtype defaults elsewhere),
    compiled for it here and pruned as the tuner and the GPU tests prune them. What the GPU would skip is
    listed as skipped; a config that does not even compile is a failure, found before the GPU window."""
    from . import kernels
    from .config import FactorShapes
    from .problem import ProblemKey

    checked, pruned = 0, {}
    for dims in check_dims(False):
        for dtype in ("float64", "float32", "bfloat16"):
            for op in ("forward", "backward"):
                key = ProblemKey.of(op, dtype, 301, FactorShapes(*dims))
                every = dims == check_dims(False)[-1]
                triton = [c for c in correctness_candidates(op, key, torch.device("cuda"), every, capability)
                          if c[0] == "triton"]
                try:
                    _, why = kernels.prune(triton, op, key, None, capability)
                except Exception as e:
                    run.fail(f"sm_{capability} pruning, {op} dims={dims} {dtype}: a config does not compile: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                checked += len(triton)
                for name, w in why.items():
                    pruned[f"{op} {name} dims={dims} {dtype}"] = w
                    run.skip(f"on sm_{capability}: {op} {name} dims={dims} {dtype}: pruned: {w}")
    run.row("pruning", capability=capability, checked=checked, pruned=pruned)
    run.say(f"sm_{capability}: {checked} Triton configs of the GPU's correctness stage compiled, "
            f"{len(pruned)} would be pruned")


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


def stage_profile(run: Run, shapes) -> None:
    """First: one training step of the LSR layer, plain LoRA of the same inner rank and the frozen layer under
    torch.profiler (CUDA activities): kernels per step with their device time, the host's time per step and
    the fraction of the step the device idles. Rows, a table in ``profile.md`` and the Chrome trace of the LSR
    step at the first shape (gzip)."""
    from . import profile_step
    from .bench import _LoRA, layer_base
    from .config import LSRConfig
    from .nn import LSRLinear

    parts = []
    for i, shape in enumerate(shapes):
        f = shape.factors
        lsr = LSRLinear(f.d_in, f.d_out, config=LSRConfig(s=f.s, r=(f.r1, f.r2), n=(f.n1, f.n2), m=(f.m1, f.m2),
                                                          init="reference")).to(run.device, shape.dtype)
        base = layer_base(lsr).to(run.device, shape.dtype)
        mods = {"frozen Linear": base, "plain LoRA": _LoRA(base, f.q, lsr.scale).to(run.device, shape.dtype),
                "LSRLinear": lsr}
        x = torch.randn(shape.tokens, f.d_in, device=run.device, dtype=shape.dtype, requires_grad=True)
        g = torch.randn(shape.tokens, f.d_out, device=run.device, dtype=shape.dtype)
        profiles = profile_step.profile_steps(mods, x, g, steps=3 if run.dry else 5,
                                              trace_dir=run.out if i == 0 else None, trace_of="LSRLinear")
        for p in profiles.values():
            run.row("profile", shape=shape.label(), **p.row())
        parts.append(profile_step.table(profiles, shape.label()))
        lsr_p, lora_p = profiles["LSRLinear"], profiles["plain LoRA"]
        run.say(f"profile {shape.label()}: LSR {lsr_p.kernels} kernels, host {lsr_p.host_us:.0f} µs, device "
                f"{lsr_p.device_us:.0f} µs, idle {100 * lsr_p.idle:.0f} %; LoRA host {lora_p.host_us:.0f} µs")
    (run.out / "profile.md").write_text("# One training step, profiled\n\n" + "\n\n".join(parts) + "\n")


def predictions(shape, device) -> dict:
    """The cost model's LSR/floor for ``shape`` (forward, forward+backward) with what dispatch runs here (a
    GPU: its own choices; the dry run: the H200's)."""
    from . import costmodel, dispatch, step
    from .device import H200, gpu_of

    gpu = gpu_of(device) if torch.device(device).type == "cuda" else H200
    plan = dispatch.planned(shape, gpu)
    f = shape.factors
    keep = step.keeps_folded(shape.tokens, f.d_out)
    out = {}
    for mode, backward in (("forward", False), ("forward+backward", True)):
        lsr_c, lsr_e = costmodel.lsr_step(plan["forward"][1], plan["backward"][1] if backward else None, f,
                                          shape.tokens, shape.dtype, keep)
        floor_c, floor_e = costmodel.floor_step(f.d_in, f.d_out, shape.tokens, shape.dtype, backward)
        out[(shape.label(), mode)] = (costmodel.price(lsr_c, costmodel.H200, lsr_e).us
                                      / costmodel.price(floor_c, costmodel.H200, floor_e).us)
    return out


def stage_graphs(run: Run) -> None:
    """CUDA graphs (``torch.compile(mode="reduce-overhead")``) around a model with LSR layers, training and
    inference: the same values and gradients as eager, and no graph silently skipped (Inductor's
    ``cudagraph_or_error``: a skip is an error here). On a CPU the same code compiles without graphs."""
    from .config import LSRConfig
    from .demo import bert_encoder
    from .nn import apply_lsr

    dev = run.device
    dtype, tol = (torch.bfloat16, 5e-2) if dev.type == "cuda" else (torch.float32, 1e-4)
    torch._dynamo.reset()
    model = apply_lsr(bert_encoder(64 if run.dry else 768, 1 if run.dry else 2).to(dev, dtype),
                      LSRConfig(s=4, r=(2, 4), init="reference", alpha=8.0), target_modules=("query", "value"))
    ids = torch.randint(1000, 20000, (2, 16) if run.dry else (8, 128), device=dev)
    params = [p for p in model.parameters() if p.requires_grad]
    import torch._inductor.config as inductor_config

    old = inductor_config.triton.cudagraph_or_error
    inductor_config.triton.cudagraph_or_error = dev.type == "cuda"
    try:
        graphed = torch.compile(model, mode="reduce-overhead")
        for mode in ("inference", "training"):
            for _ in range(3):  # warm-up runs record, then replay
                torch.compiler.cudagraph_mark_step_begin()
                if mode == "inference":
                    with torch.no_grad():
                        out = graphed(input_ids=ids).last_hidden_state.clone()
                else:
                    for p in params:
                        p.grad = None
                    graphed(input_ids=ids).last_hidden_state.float().square().mean().backward()
                    got = [p.grad.clone() for p in params]
            if mode == "inference":
                with torch.no_grad():
                    want = model(input_ids=ids).last_hidden_state
                err = (out.float() - want.float()).abs().max().item() / max(1.0, want.float().abs().max().item())
            else:
                for p in params:
                    p.grad = None
                model(input_ids=ids).last_hidden_state.float().square().mean().backward()
                err = max((a.float() - p.grad.float()).abs().max().item() / max(1.0, p.grad.float().abs().max().item())
                          for a, p in zip(got, params))
            run.row("graphs", mode=mode, rel_err=err)
            if not err <= tol:
                run.fail(f"CUDA graphs, {mode}: relative error {err:.3g} > {tol} against eager")
            else:
                run.say(f"CUDA graphs, {mode}: values{' and gradients' if mode == 'training' else ''} ok")
    finally:
        inductor_config.triton.cudagraph_or_error = old


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
    rows = bench.bench_shape(shape, device=run.device, rounds=10 if run.dry else 20, budget_s=bench_s / 2,
                             graphs=True)
    for r in rows:
        run.row("bench", **r)
    for (label, mode), ratio in predictions(shape, run.device).items():
        run.row("predicted", shape=label, mode=mode, lsr_over_floor=round(ratio, 4))
    by = {(r["mode"], r["provider"]): r["p50_ms"] for r in rows}
    for mode in ("forward", "forward+backward"):
        run.say(f"{shape.label()} {mode}: LSR/floor {by[mode, 'lsr'] / by[mode, 'floor']:.3f} "
                f"(graphs {by[mode, 'lsr_graphs'] / by[mode, 'floor_graphs']:.3f}), "
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
    models = model_variants(base, LSRConfig(s=4, r=(2, 4), init="reference"), peft_lora=True,
                            graphs=run.device.type == "cuda")
    ids = torch.randint(1000, 20000, (batch, seq), device=run.device)
    name = f"BERT {layers} layers x {hidden} (random weights), {str(dtype)[6:]}, batch {batch} x seq {seq}"
    for r in throughput(models, ids, rounds=(5, 4) if run.dry else (15, 10)):
        run.row("model", name=name, **r)


# ---- the run ----------------------------------------------------------------------------------------

def plan(dry: bool):
    """(shape, tune seconds, bench seconds) in the order they run, the model's size, the mixed-batch cases
    (layer width, [(K, distribution, requests, tokens per request)]) and the quantized-base layer (d_in, d_out,
    token counts: decoding, a training batch)."""
    from . import workloads

    if dry:
        return ([(s, 30.0, 30.0) for s in workloads.dry_run_shapes()], dict(hidden=64, layers=1, batch=2, seq=32),
                (64, [(K, "uniform", 4, 8) for K in (1, 8)]), (256, 512, [8, 32]))
    shapes = workloads.gpu_shapes()
    mixed = [(s.adapters, dist, s.num_segments, s.tokens // s.num_segments) for s in workloads.gpu_mixed_shapes()
             for dist in ("uniform", "skewed")]
    return ([(shapes[0], 50.0, 60.0), (shapes[1], 30.0, 40.0)] + [(s, 25.0, 35.0) for s in shapes[2:]],
            dict(hidden=768, layers=4, batch=32, seq=256), (4096, mixed), (4096, 11008, [16, 4096]))


# Seconds each stage is given on the H200 (the estimate it must fit before it starts; the last run's own times
# are its "stage" rows): first run 3 at 9d2c79e (correctness 28.5, compiled layer 8.6, host 2.0, 4096² tune +
# bench 35.9, 768² 16.4, whole model 45.4, 11008x4096 28.6), raised where this check does more (every Triton
# config of the Kronecker parts compiled and raced, CUDA graphs and peft LoRA beside the model); new stages
# estimated. Part 1 fits the default 330 s budget: the first command of a 15-minute window, start-up included.
STAGE_SECONDS = {"profile": 30, "graphs": 25, "whole model": 90, "correctness": 60, "compiled layer": 30,
                 "host overhead": 5, "mixed batch": 90, "quantized base": 60}


def stages(run: Run, part: int, target: str, log_dir) -> list[tuple]:
    """(name, seconds needed, function, args) of one command. Part 1, in order of what the last windows left
    least known: the profile of one training step, the target shapes tuned and side by side (eager, compiled,
    CUDA graphs; TVM-CUDA artifacts race when TVM's runtime is installed), CUDA graphs around a model, the whole
    model with peft LoRA beside it. Part 2: every kernel against float64, compiled layers, host µs per call,
    many adapters in one batch, a quantized base, then the other shapes."""
    shapes, model, mixed, quantized = plan(run.dry)
    dry = run.dry
    sec = (lambda name: 10.0) if dry else STAGE_SECONDS.get
    shape_stage = lambda shp, tune_s, bench_s: (f"shape {shp.label()}", 2 * 30.0 if dry else tune_s + bench_s,  # noqa: E731
                                               stage_shape, (run, shp, target, tune_s, bench_s, log_dir))
    first = [("profile", sec("profile"), stage_profile, (run, [s for s, _, _ in shapes[:2]])),
             *[shape_stage(*spec) for spec in shapes[:2]],
             ("graphs", sec("graphs"), stage_graphs, (run,)),
             ("whole model", sec("whole model"), stage_model, (run, *model.values()))]
    second = [("correctness", sec("correctness"), stage_correctness, (run,)),
              ("compiled layer", sec("compiled layer"), stage_compiled, (run,)),
              ("host overhead", sec("host overhead"), stage_overhead, (run,)),
              ("mixed batch", sec("mixed batch"), stage_mixed, (run, *mixed)),
              ("quantized base", sec("quantized base"), stage_quantized, (run, *quantized)),
              *[shape_stage(*spec) for spec in shapes[2:]]]
    return {1: first, 2: second, 0: first + second}[part]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lsr_compile.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "results/gpu"))
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check (default 330)")
    ap.add_argument("--part", type=int, choices=(0, 1, 2), default=1,
                    help="1: profile, target shapes side by side, CUDA graphs, whole model (the first command); "
                         "2: correctness, compiled layers, mixed batch, quantized base, other shapes (the second); "
                         "0: both (a long lease)")
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
    for name, need, fn, args in stages(run, a.part, target, log_dir):
        run.stage(name, need, fn, *args)
    run.write_tables()
    print((a.out / "gpu_check.md").read_text(), flush=True)
    run.say(f"done (part {a.part}): {len(run.failures)} correctness failures, {len(run.skipped)} skipped; files in "
            f"{a.out}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
