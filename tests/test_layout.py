"""The package's import graph follows the pipeline: every import (module-level or inside a function) goes
to the same stage or one below it, and no module imports one that imports it back."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lsr_compile"

# lowest first; a module may import its own stage and the stages before it
STAGES = [
    ("shipped", "config", "_peft_type", "problem", "reference", "formulations", "step", "mixed_formulations", "device",
     "quantized", "base_layers"),
    ("expr",),  # 1. expression
    ("schedule_spaces",),  # 2. schedule space
    ("kernels",),  # 3. kernels
    ("costmodel",),  # what a step of kernels costs on a device
    ("logs",),  # 4. the tuning-log format, under the tuner that writes it and dispatch that reads it
    ("tuning",),  # 5. tuner
    ("dispatch",),  # 6. run-time choice
    ("ops", "inductor_autotune"),  # 7. op registry (and its candidates for max-autotune)
    ("inference_cache",),  # the no-graph path of a layer and what it keeps between calls
    ("nn", "bank", "fit_diagnostic"),  # 8. layers (and which structure fits a model, before training)
    ("peft",),  # 9. peft glue
    ("workloads", "bench", "bench_mixed", "bench_quantized", "bench_decode", "bench_tuned", "bench_llm",
     "bench_compile", "profile_step", "demo", "gpu_check", "pretrained", "cli"),  # applications
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.add(sub if _is_module(sub) else target)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        graph[mod] = {t for t in out if t.startswith("lsr_compile") and t != mod}
    return graph


def stage(mod: str) -> int:
    top = mod.split(".")[1]
    return next(i for i, names in enumerate(STAGES) if top in names)


def test_every_module_has_a_stage():
    for mod in import_graph():
        if mod != "lsr_compile":
            stage(mod)  # StopIteration names a module missing from STAGES


def test_no_import_goes_up_the_pipeline():
    up = [f"{m} -> {t}" for m, ts in import_graph().items() if m != "lsr_compile" for t in ts
          if t == "lsr_compile" or stage(t) > stage(m)]
    assert up == []


def test_no_import_circle():
    graph = {m: ts for m, ts in import_graph().items() if m != "lsr_compile"}
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_graph_is_read():  # a parser that found nothing would pass the two tests above
    g = import_graph()
    assert "lsr_compile.dispatch" in g["lsr_compile.ops"] and "lsr_compile.kernels.tvm_lower" in g[
        "lsr_compile.kernels.tvm_cuda"]
