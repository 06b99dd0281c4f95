"""The real-model benchmark's cells, sizes and table, on a random-weight model shaped like SmolLM2 (the real
model's run is `lsr-compile bench-llm`, after `make smollm2`)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsr_compile import bench_llm, workloads


def test_a_cell_times_every_task_for_every_provider_and_the_table_reads_them():
    base = workloads.tiny_smollm2()
    models = bench_llm.providers(base, bench_llm.TARGETS["q,v"])
    old = (bench_llm.PROMPT, bench_llm.NEW_TOKENS, bench_llm.PREFILLS, bench_llm.TRAIN_SEQ)
    bench_llm.PROMPT, bench_llm.NEW_TOKENS, bench_llm.PREFILLS, bench_llm.TRAIN_SEQ = 4, 3, (8, 16), 8
    try:
        rows = bench_llm.cell_rows(models, "q,v", torch.float32, batch=1, threads=1, rounds=1)
        rows += bench_llm.cell_rows(models, "q,v", torch.float32, batch=2, threads=1, rounds=1)
    finally:
        bench_llm.PROMPT, bench_llm.NEW_TOKENS, bench_llm.PREFILLS, bench_llm.TRAIN_SEQ = old
    tasks = {(r["batch"], r["task"]) for r in rows}
    assert tasks == {(1, "decode"), (1, "prefill 8"), (1, "prefill 16"), (1, "train step"), (2, "decode"),
                     (2, "train step")}
    assert {r["provider"] for r in rows if r["task"] == "train step"} == {"peft LoRA r=8", "LSR"}
    assert all(r["vs_lora"] == 1.0 for r in rows if r["provider"] == "peft LoRA r=8")
    rows += bench_llm.size_rows(base)
    text = bench_llm.table(rows)
    assert "| q,v | float32 | 2 | 1 | **" in text and "adapter file" in text
    size = {(r["targets"], r["provider"]): r for r in rows if r["kind"] == "size"}
    assert size["q,v", "LSR"]["adapter_bytes"] < size["q,v", "peft LoRA r=8"]["adapter_bytes"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc")
def test_peak_memory_is_the_probes_own_from_the_reset_on():
    """A child spawned by a large parent reports its own peak (``ru_maxrss`` would give the parent's), and the
    peak after a reset counts what was touched since."""
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MB resident in this process
    code = "from lsr_compile import bench_llm; print(*bench_llm._resident_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    now, peak = map(float, child.stdout.split())
    assert peak < bench_llm._resident_mb()[0] - 250 and now <= peak
    del ballast
    Path("/proc/self/clear_refs").write_text("5")
    start, _ = bench_llm._resident_mb()
    block = torch.ones(200 * 2**20 // 4)
    del block
    _, peak = bench_llm._resident_mb()
    assert peak - start > 190
