"""A tiny real tuning run: candidates checked, the winner recorded, then dispatched."""
import json
import os
import warnings

import pytest
import torch

import lsr_compile as lc
from lsr_compile import dispatch, logs
from lsr_compile.tuning import TuningError, search, tune
from lsr_compile.device import device_id

from models import adapter_share, strong_adapters

SHAPE = lc.LSRShape(96, 48, 32, s=2, r=(2, 2))


def test_tiny_tuning_run_writes_log_and_winner_is_dispatched(tmp_path, fresh_dispatch):
    dirs, known = dispatch.log_dirs(), len(dispatch.records("llvm", device_id("cpu")))
    recs = tune([SHAPE], target="llvm", log_dir=tmp_path, trials=2, time_budget_s=60, progress=False)
    assert dispatch.log_dirs() == dirs  # tuning elsewhere changes nothing in dispatch until the user says so
    assert "tuned:" not in lc.explain(SHAPE)
    assert lc.load_logs(tmp_path) == known + 2
    assert [r["key"]["op"] for r in recs] == ["forward", "backward"]
    for r in recs:
        assert r["device"]["id"] == device_id("cpu") and r["rejected"] == {}
        assert r["time_ms"] <= search.TIE * min(r["candidates_ms"].values())  # the fastest, or the default tied
        assert any(n.startswith("tvm:") for n in r["candidates_ms"])  # compiled candidates were timed
    path = logs.log_path(tmp_path, "llvm", device_id("cpu"), "forward")
    assert json.loads(path.read_text().splitlines()[-1])["variant"] == recs[0]["variant"]
    text = lc.explain(SHAPE)
    assert f"forward  {recs[0]['backend']}:{recs[0]['variant']}" in text and "tuned:" in text
    layer = strong_adapters(lc.LSRLinear(48, 32, config=lc.LSRConfig(s=2, r=2)))
    x = torch.randn(SHAPE.tokens, 48)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5  # the tuned kernel must get the adapter right
    torch.testing.assert_close(layer(x), lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2,
                                                                  layer.B1, layer.B2, layer.scale))


def test_tuning_into_the_default_directory_applies_at_once(fresh_dispatch):
    from lsr_compile import shipped

    assert "tuned:" not in lc.explain(SHAPE)
    recs = tune([SHAPE], target="llvm", trials=0, ops=("forward",), progress=False)
    path = logs.log_path(shipped.user_log_dir(), "llvm", device_id("cpu"), "forward")
    assert path.is_file() and str(path).startswith(os.environ["XDG_DATA_HOME"])  # conftest's, not the home dir
    assert f"forward  torch:{recs[0]['variant']}  (tuned: {path}:1" in lc.explain(SHAPE)
    path.unlink()
    dispatch.invalidate()


def test_wrong_candidate_is_rejected_not_recorded(tmp_path, fresh_dispatch, monkeypatch):
    from lsr_compile import kernels

    real_build = kernels.build

    def build(backend, op, variant, *args):
        fn = real_build(backend, op, variant, *args)
        if (backend, op, variant) != ("torch", "forward", "fold"):
            return fn

        def broken(x, weight, bias, A1, A2, B1, B2, scale):
            y, *saved = fn(x, weight, bias, A1, A2, B1, B2, scale)
            return (y * 1.001, *saved)
        return broken

    monkeypatch.setattr(kernels, "build", build)
    recs = tune([SHAPE], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)
    assert "torch:fold" in recs[0]["rejected"] and "off by" in recs[0]["rejected"]["torch:fold"]
    assert recs[0]["variant"] != "fold"


def test_statically_pruned_candidate_is_never_built_or_timed(tmp_path, fresh_dispatch, monkeypatch):
    """What the tuner knows without running a candidate (it spills, its shared memory does not fit) keeps it out
    of the race: reported as pruned, never built or timed."""
    from lsr_compile import kernels

    built = []
    real_build = kernels.build
    monkeypatch.setattr(kernels, "build", lambda backend, op, variant, *a: built.append(variant) or
                        real_build(backend, op, variant, *a))
    monkeypatch.setattr(kernels, "static_problem", lambda backend, op, variant, *a:
                        "spills (255 registers)" if variant == "factored" else None)
    rec, = tune([SHAPE], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)
    assert rec["skipped"] == {"torch:factored": "pruned: spills (255 registers)"}
    assert "torch:factored" not in rec["candidates_ms"] and "factored" not in built
    assert {"torch:fold", "torch:materialise"} <= set(rec["candidates_ms"])


def test_a_tvm_record_is_built_and_used(tmp_path, fresh_dispatch):
    key = SHAPE.key("forward")
    rec = {"schema": logs.SCHEMA, "device": {"id": device_id("cpu")}, "versions": logs.library_versions(),
           "key": key.as_dict(), "backend": "tvm", "variant": "materialise",
           "config": {"vec": 16, "rows": 16, "unroll": 0}, "time_ms": 0.1}
    logs.append(logs.log_path(tmp_path, "llvm", device_id("cpu"), "forward"), rec)
    lc.load_logs(tmp_path)
    assert "forward  tvm:materialise[rows=16, unroll=0, vec=16]" in lc.explain(SHAPE)
    layer = strong_adapters(lc.LSRLinear(48, 32, config=lc.LSRConfig(s=2, r=2)))
    x = torch.randn(SHAPE.tokens, 48)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5  # the tuned kernel must get the adapter right
    torch.testing.assert_close(layer(x), lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2,
                                                                  layer.B1, layer.B2, layer.scale))
    chosen = [c for op, c in dispatch.cached_choices() if op == "forward"]
    assert chosen and chosen[0].backend == "tvm"


def test_corrupt_log_is_ignored_with_warning_and_default_used(tmp_path, fresh_dispatch):
    path = logs.log_path(tmp_path, "llvm", device_id("cpu"), "forward")
    path.parent.mkdir(parents=True)
    path.write_text("garbage\n")
    with pytest.warns(logs.TuningLogWarning, match="corrupt"):
        lc.load_logs(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "default:" in lc.explain(SHAPE)


def test_bad_tune_arguments():
    with pytest.raises(TuningError, match="unknown target 'rocm'"):
        tune([SHAPE], target="rocm")
    with pytest.raises(TuningError, match="LSRShape"):
        tune([(96, 48, 32)])
    with pytest.raises(TuningError, match="no LSRLinear layers"):
        tune(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(FileNotFoundError):
        lc.load_logs("/nonexistent/logs")


def test_tuning_a_model_prints_its_estimate_and_covers_decode_and_prefill(tmp_path, fresh_dispatch, capsys,
                                                                         monkeypatch):
    """tune(model): each distinct layer problem at a decode and a prefill token count by default, the whole call
    sized to MODEL_BUDGET_S, the estimate printed before any work."""
    from lsr_compile.tuning import search

    model = lc.apply_lsr(torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Linear(32, 32)),
                         lc.LSRConfig(s=2, r=2), target_modules=("0", "1"))
    seen = []
    monkeypatch.setattr(search, "_job", lambda shape, op, target, device, trials, budget, *a: seen.append(
        (shape.tokens, shape.factors.d_in, op, budget)))
    assert tune(model, target="llvm", log_dir=tmp_path) == []
    out = capsys.readouterr().out
    assert "tune: 8 jobs (4 layer problems x 2 ops)" in out and "at most" in out
    assert sorted({(n, d) for n, d, _, _ in seen}) == [(1, 32), (1, 48), (2048, 32), (2048, 48)]
    # instant jobs leave their share to the jobs after them: the whole call's budget is MODEL_BUDGET_S
    assert [b for *_, b in seen] == pytest.approx([search.MODEL_BUDGET_S / (8 - i) for i in range(8)], rel=1e-3)


def test_a_winner_timed_below_the_frozen_layer_is_retimed_then_refused(tmp_path, fresh_dispatch, monkeypatch):
    """No layer is faster than its frozen GEMM: a timing that says so (a loaded machine) is re-timed, and if it
    still does, nothing is recorded and the user is told."""
    from lsr_compile.tuning import search

    calls = []

    def fake_measure(cands, device, rounds=10, budget_s=None, **kw):
        calls.append(sorted(cands))
        return {n: [0.5 if n != "floor" else 1.0] * 3 for n in cands}
    monkeypatch.setattr(search, "measure", fake_measure)
    with pytest.warns(RuntimeWarning, match="faster than its frozen GEMM"):
        recs = tune([SHAPE], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)
    assert recs == [] and len(calls) == 2 and len(calls[1]) == 2 and "floor" in calls[1]
    assert not any(tmp_path.rglob("*.jsonl"))

    def retimed(cands, device, rounds=10, budget_s=None, **kw):
        calls.append(sorted(cands))
        slow = 0.5 if len(calls) == 3 else 1.2  # implausible once, plausible when re-timed
        return {n: [slow if n != "floor" else 1.0] * 3 for n in cands}
    monkeypatch.setattr(search, "measure", retimed)
    recs = tune([SHAPE], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)
    assert len(recs) == 1 and recs[0]["time_ms"] == 1.2


def test_records_of_another_thread_count_are_used_and_said(tmp_path, fresh_dispatch):
    """Records tuned with 2 threads serve a process using 1 (or 4) when it has none of its own, and explain
    says whose they are."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tune([SHAPE], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)
        two = device_id("cpu")
        torch.set_num_threads(1)
        one = device_id("cpu")
        assert one != two
        lc.load_logs(tmp_path)
        text = lc.explain(SHAPE)
        assert "tuned:" in text and "tuned with 2 threads; this process uses 1: the nearest" in text
        assert dispatch.nearest_thread_count("llvm", one) == two
        assert dispatch.nearest_thread_count("cuda", one) is None
    finally:
        torch.set_num_threads(old)


def test_one_budget_for_the_call_a_job_that_overruns_leaves_less_to_the_rest(tmp_path, fresh_dispatch, monkeypatch):
    """``time_budget_s`` holds for the whole call: each job gets what is left over the jobs left, so a job that
    ran long (TVM's first import, a slow build) is paid for by the jobs after it, and the call ends on time."""
    clock = [0.0]
    monkeypatch.setattr(search.time, "perf_counter", lambda: clock[0])
    budgets = []

    def job(shape, op, target, device, trials, budget, *a):
        budgets.append(budget)
        clock[0] += 3 * budget if len(budgets) == 1 else budget  # the first job overruns threefold
    monkeypatch.setattr(search, "_job", job)
    shapes = [lc.LSRShape(n, 48, 32, s=2, r=(2, 2)) for n in (1, 96)]
    tune(shapes, target="llvm", log_dir=tmp_path, time_budget_s=8.0, progress=False)
    assert budgets[0] == pytest.approx(2.0) and budgets[1] == pytest.approx(1.0 / 3 * 2) and clock[0] <= 8.0 + 1e-9
    assert sum(budgets) <= 8.0


def test_a_compiled_candidate_is_not_started_when_its_build_cannot_fit(monkeypatch):
    """A first TVM candidate costs TVM's import: with less left than that, it is skipped for time, and so is
    any build once half the job's budget is spent."""
    monkeypatch.setattr(search.time, "perf_counter", lambda: 10.0)
    monkeypatch.delitem(search.sys.modules, "tvm", raising=False)
    assert search._out_of_time("tvm", started=10.0, budget_s=2.0) == "time budget"
    assert search._out_of_time("tvm", started=10.0, budget_s=60.0) is None
    monkeypatch.setitem(search.sys.modules, "tvm", object())
    monkeypatch.setitem(search._build_s, "tvm", 0.3)
    assert search._out_of_time("tvm", started=10.0, budget_s=2.0) is None
    assert search._out_of_time("tvm", started=8.9, budget_s=2.0) == "time budget"


def test_decode_sized_forwards_are_timed_as_decoding_runs_them(tmp_path, fresh_dispatch, monkeypatch):
    """At one to 16 rows a forward record is what the no-graph path runs: every candidate is timed over A and Bᵀ
    built once (none is rebuilt in the timed calls), one call at a time, and checked against the reference."""
    from lsr_compile import step

    timed = {}

    def capture(cands, device, rounds=10, budget_s=None, **kw):
        timed.update(cands)
        return {n: [1.0 if n != "floor" else 0.5] * 3 for n in cands}
    monkeypatch.setattr(search, "measure", capture)
    recs = tune([lc.LSRShape(1, 48, 32, s=2, r=(2, 2))], target="llvm", log_dir=tmp_path, trials=2,
                ops=("forward",), progress=False)
    assert len(recs) == 1 and any(n.startswith("tvm:") for n in recs[0]["candidates_ms"])
    builds = [0]
    real = step.AtenParts.factors
    monkeypatch.setattr(step.AtenParts, "factors", lambda self, *f: builds.__setitem__(0, builds[0] + 1) or
                        real(self, *f))
    lean = [n for n in timed if n in ("torch:materialise", "torch:fold")]
    assert len(lean) == 2
    for name in lean:
        out = timed[name]()
        assert isinstance(out, tuple) and out[0].shape == (1, 32)
    assert builds[0] == 0  # the inference forms read A and Bᵀ built before the timing


@pytest.mark.parametrize("default_over_best,wins", [(1.0, "default"), (1.02, "default"), (1.1, "best")])
def test_the_untuned_choice_is_kept_unless_a_candidate_beats_it(default_over_best, wins, tmp_path,
                                                                 fresh_dispatch, monkeypatch):
    """A record never makes a problem slower than no record: within the timing noise (``TIE``) of the fastest,
    what runs untuned is what is recorded."""
    from lsr_compile import costmodel, kernels

    shape = lc.LSRShape(1, 48, 32, s=2, r=(2, 2))
    default = kernels.candidate_name(*costmodel.untuned("forward", shape.key("forward"), torch.device("cpu"))[:3])

    def fake(cands, device, rounds=10, budget_s=None, **kw):
        best = next(n for n in cands if n not in (default, "floor"))
        return {n: [1.0 if n == best else default_over_best if n == default else 5.0 if n != "floor" else 0.5] * 3
                for n in cands}
    monkeypatch.setattr(search, "measure", fake)
    rec = tune([shape], target="llvm", log_dir=tmp_path, trials=0, ops=("forward",), progress=False)[0]
    name = kernels.candidate_name(rec["backend"], rec["variant"], rec["config"])
    assert (name == default) == (wins == "default")


def test_tuning_a_model_draws_one_progress_bar(tmp_path, fresh_dispatch, capsys):
    """One bar for the call (not one per job), redrawn rarely where stderr is no terminal."""
    model = lc.apply_lsr(torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Linear(32, 32)),
                         lc.LSRConfig(s=2, r=2), target_modules=("0", "1"))
    tune(model, target="llvm", log_dir=tmp_path, trials=0, time_budget_s=4)
    err = capsys.readouterr().err
    assert err.count("tune:") <= 3 and "100%" in err and len(err) < 2000, err
