"""One layer's step side by side on this CPU, for whichever lsr_compile checkout is given: the frozen Linear, the
LSR layer (eager, compiled), the reference formulation and plain LoRA, forward and forward+backward, gradients set
to None before each step (as an optimizer's zero_grad does); ratios to the frozen layer as JSON. Compare two
revisions on one machine:

    git worktree add /tmp/old <rev>
    python examples/compare_step.py /tmp/old          # [tune] [nokeep]
    python examples/compare_step.py .

``tune``: tune the shape first (into a temporary log directory); ``nokeep``: also the layer with the folded
weight not kept for the backward (lsr_compile.step.keep_folded_weight), beside.
"""
import json
import sys
import tempfile

root = sys.argv[1]
sys.path.insert(0, root)
import torch  # noqa: E402
import lsr_compile as lc  # noqa: E402
from lsr_compile import bench  # noqa: E402
from lsr_compile.tuning.timing import measure, median  # noqa: E402
shape = lc.LSRShape(2048, 768, 768, s=4, r=(2, 4), dtype=torch.float32)
logdir = tempfile.mkdtemp()
if len(sys.argv) > 2 and sys.argv[2] == "tune":
    lc.tune([shape], target="llvm", log_dir=logdir, progress=False)
    lc.load_logs(logdir)
print(lc.explain(shape))
torch._dynamo.reset()
mods = bench.providers(shape, "cpu")
mods = {k: mods[k] for k in ("floor", "lsr", "lsr_compiled", "reference", "lora")}
if len(sys.argv) > 3:  # the same LSR layer with the folded weight not kept, beside
    from lsr_compile import step as lsr_step
    class NoKeep(torch.nn.Module):
        def __init__(s, m): super().__init__(); s.m = m
        def forward(s, x):
            with lsr_step.folded_weight_kept(False):
                return s.m(x)
    mods["lsr_nokeep"] = NoKeep(mods["lsr"])
f = shape.factors
x = torch.randn(shape.tokens, f.d_in); g = torch.randn(shape.tokens, f.d_out)
def step(m, xin, mode):
    if mode == "forward":
        def run():
            with torch.no_grad(): m(xin)
        return run
    ps = [p for p in m.parameters() if p.requires_grad]
    def run():
        xin.grad = None
        for p in ps: p.grad = None
        m(xin).backward(g)
    return run
out = {}
for mode in ("forward", "forward+backward"):
    xin = x.clone().requires_grad_(mode != "forward")
    t = measure({k: step(m, xin, mode) for k, m in mods.items()}, "cpu", warmup=3, rounds=25)
    fl = median(t["floor"])
    out[mode] = {k: round(median(v) / fl, 3) for k, v in t.items()}
    out[mode]["floor_ms"] = round(fl, 3)
print(json.dumps(out))
