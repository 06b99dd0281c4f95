"""The GPU check's dry run: the same stages on this CPU (Triton in its interpreter, tiny shapes), so that the
check's first run is never on the GPU. Also: the budget is a hard plan (stages that do not fit are skipped and
listed), and rows are on disk as soon as they are measured."""
import importlib.util
import json

import pytest

from lsr_compile import gpu_check


def _rows(out):
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~3 minutes on 2 cores: every stage of both parts, sm_90 compiles included
def test_dry_run_writes_every_stage(tmp_path, fresh_dispatch):
    """Both commands' stages (``--part 0``), in the order of the two commands: part 1 starts with the profile."""
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--part", "0", "--out", str(out), "--budget", "400"]) == 0
    rows = _rows(out)
    kinds = {r["kind"] for r in rows}
    assert {"env", "profile", "correctness", "pruning", "overhead", "tune", "bench", "predicted", "graphs", "model",
            "mixed"} <= kinds, kinds
    assert not [r for r in rows if r["kind"] == "failure"]
    assert next(r for r in rows if r["kind"] == "correctness")["passed"] > 20
    # the GPU's share of the correctness stage, pruned here for sm_90 as the tuner and the GPU tests prune it:
    # every Triton config it would run there (bf16 every point at 768², the dtype defaults elsewhere) compiles;
    # what would not fit is listed as skipped (with Triton 3.6 the 32x256 fold point spills 8 B at 768²)
    pruning = next(r for r in rows if r["kind"] == "pruning")
    assert pruning["capability"] == 90 and pruning["checked"] >= 80
    assert all("spills" in why or "shared memory" in why for why in pruning["pruned"].values()), pruning
    assert len(pruning["pruned"]) <= 2, pruning
    skipped = [r["what"] for r in rows if r["kind"] == "skipped"]
    assert all(any(s.startswith(f"on sm_90: {name}") for s in skipped) for name in pruning["pruned"])
    providers = {r["provider"] for r in rows if r["kind"] == "bench"}
    assert {"floor", "lsr", "lsr_compiled", "lsr_graphs", "floor_graphs", "reference", "lora", "peft_lokr"} <= providers
    profiles = {r["name"] for r in rows if r["kind"] == "profile"}
    assert profiles == {"frozen Linear", "plain LoRA", "LSRLinear"} and (out / "profile.md").exists()
    assert list(out.glob("trace-*.json.gz")), "the profiled step's Chrome trace"
    assert {r["mode"] for r in rows if r["kind"] == "graphs"} == {"inference", "training"}
    assert {r["model"] for r in rows if r["kind"] == "model"} >= {"peft LoRA (same rank) + torch.compile"}
    md = (out / "gpu_check.md").read_text()
    assert "| shape (d_out x d_in, N)" in md and "## Whole model" in md and "Correctness failures: 0" in md
    assert "## Many adapters in one batch" in md
    assert {"lsr mixed", "lsr loop", "peft lora mixed"} <= {r["provider"] for r in rows if r["kind"] == "mixed"}
    quantized = [r for r in rows if r["kind"] == "quantized"]
    assert {r["dense"] for r in quantized} == {"bf16"} and {r["tokens"] for r in quantized} == {8, 32}
    if importlib.util.find_spec("torchao") is not None:
        assert {"int8_weight_only", "intx_weight_only"} <= {r["base_format"] for r in quantized}
    assert "## A quantized frozen base" in md
    assert (out / "tuning-forward.jsonl").exists() and (out / "tuning-backward.jsonl").exists()
    stages = [r["name"] for r in rows if r["kind"] == "stage"]
    assert stages[:2] == ["environment", "profile"]  # profile first
    assert stages.index("whole model") < stages.index("correctness")  # part 1, then part 2


def test_a_budget_too_small_skips_stages_and_still_writes_the_report(tmp_path, fresh_dispatch):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--part", "0", "--out", str(out), "--budget", "3"]) == 0
    rows = _rows(out)
    skipped = [r["what"] for r in rows if r["kind"] == "skipped"]
    assert any(s.startswith("shape ") and "left in the budget" in s for s in skipped)
    assert not [r for r in rows if r["kind"] in ("bench", "model")]
    assert "Skipped" in (out / "gpu_check.md").read_text()


def test_without_a_gpu_the_real_check_refuses(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check would run")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().out
