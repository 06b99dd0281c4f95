"""Tuning logs: round trip, bad lines skipped with a warning, concurrent appends lose nothing."""
import json
import multiprocessing as mp
import warnings

import pytest

from lsr_compile import logs
from lsr_compile.problem import ProblemKey

DEV = "test-cpu-avx2-2t"


def _record(op="forward", tokens=64, backend="torch", variant="fold", device=DEV, **kw):
    key = ProblemKey(op, "float32", tokens, 2, 2, 2, 4, 6, 5, 3)
    return {"schema": logs.SCHEMA, "device": {"id": device}, "versions": logs.library_versions(),
            "key": key.as_dict(), "backend": backend, "variant": variant, "config": {}, "time_ms": 1.0} | kw


def test_round_trip_and_last_record_wins(tmp_path):
    path = logs.log_path(tmp_path, "llvm", DEV, "forward")
    logs.append(path, _record(variant="materialise"))
    logs.append(path, _record(variant="fold"))
    recs = logs.read(logs.files_for([tmp_path], "llvm", DEV), DEV, "llvm")
    assert len(recs) == 1 and next(iter(recs.values())).variant == "fold"
    assert next(iter(recs.values())).source.endswith("forward.jsonl:2")


@pytest.mark.parametrize("line,match", [
    ("{not json", "corrupt"),
    (json.dumps(_record() | {"schema": 99}), "corrupt"),
    (json.dumps(_record(backend="cuDNN")), "corrupt"),
    (json.dumps({k: v for k, v in _record().items() if k != "key"}), "corrupt"),
    (json.dumps(_record(device="other-gpu-sm90")), "record.s. of device 'other-gpu-sm90'"),
    (json.dumps(_record() | {"versions": {"torch": "1.0", "tvm": "0.1", "triton": None}}), "of versions"),
    (json.dumps(_record(backend="triton", variant="fused")), "not one a llvm log can hold"),
    (json.dumps(_record(backend="tvm", variant="materialise", config={"vec": 16, "rows": 10**9, "unroll": 0})),
     "not a point of the llvm schedule space"),
    (json.dumps(_record(time_ms=float("nan"))), "time_ms"),
    (json.dumps(_record() | {"key": _record()["key"] | {"token_bucket": "64"}}), "key.token_bucket"),
    (json.dumps(_record() | {"key": _record()["key"] | {"s": True}}), "key.s"),
])
def test_bad_lines_are_skipped_with_a_warning_and_good_ones_kept(tmp_path, line, match):
    path = logs.log_path(tmp_path, "llvm", DEV, "forward")
    logs.append(path, _record(tokens=128))
    with open(path, "a") as fh:
        fh.write(line + "\n")
    logs.append(path, _record(tokens=256))
    with pytest.warns(logs.TuningLogWarning, match=match):
        recs = logs.read([path], DEV, "llvm")
    assert sorted(k.token_bucket for k in recs) == [128, 256]


def test_bytes_that_are_not_utf8_skip_one_line_only(tmp_path):
    path = logs.log_path(tmp_path, "llvm", DEV, "forward")
    logs.append(path, _record(tokens=128))
    with open(path, "ab") as fh:
        fh.write(b'{"schema": 1, "\xff\xfe broken"}\n')
    logs.append(path, _record(tokens=256))
    with pytest.warns(logs.TuningLogWarning, match=r"forward.jsonl:2: corrupt record skipped \(UnicodeDecodeError"):
        recs = logs.read([path], DEV, "llvm")
    assert sorted(k.token_bucket for k in recs) == [128, 256]


def _writer(args):
    path, worker, n = args
    for i in range(n):
        logs.append(path, _record(tokens=16 * (1 + i), variant=f"w{worker}") | {"pad": "x" * 3000})


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "llvm" / DEV / "forward.jsonl"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_writer, [(path, w, 50) for w in range(4)])
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    assert all(json.loads(l)["schema"] == logs.SCHEMA for l in lines)  # no torn or interleaved line


@pytest.mark.parametrize("tail,kept,corrupt", [
    (json.dumps(_record(tokens=128)), [64, 128, 256, 512], []),  # a valid record whose newline is missing
    ('{"schema": 2, "key": {"op": "forw', [64, 256, 512], ["forward.jsonl:2:"]),  # a write cut short
    ("", [64, 256, 512], []),  # a terminated file: nothing added
])
def test_an_append_after_an_unterminated_last_line_loses_no_record(tmp_path, tail, kept, corrupt):
    """A file whose last line lacks its newline (a hand edit, a write cut short): the next record starts a line of
    its own, and a valid unterminated line stays valid (the two were glued into one corrupt line, both lost)."""
    path = logs.log_path(tmp_path, "llvm", DEV, "forward")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_record(tokens=64)) + "\n" + tail)
    logs.append(path, _record(tokens=256))
    logs.append(path, _record(tokens=512))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = logs.read([path], DEV, "llvm")
    assert sorted(k.token_bucket for k in recs) == kept
    skipped = [str(w.message) for w in caught if "corrupt record skipped" in str(w.message)]
    assert len(skipped) == len(corrupt) and all(c in m for c, m in zip(corrupt, skipped)), skipped
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\n\n" not in data
