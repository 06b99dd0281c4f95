"""An AdapterBank under a hostile operator: adapters it cannot serve whole are refused, changes are
all-or-nothing and never reach a batch in flight, and every refusal names its cause; export_lora through a
symlink or onto the working directory."""
import json
import threading
import time

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lsr_compile as lc
from lsr_compile.bank import AdapterBank

from models import tiny_bert, tokens

CFG = dict(s=4, r=2, target_modules=["query", "value"], init="reference", alpha=8.0)
ENCODER = "base_model.model.bert."  # what peft's keys put before the encoder's own module paths


def _saved(folder, seed, task_type=None, **cfg):
    """A saved peft LSR adapter of the tiny BERT (factors and any trained head drawn ~ 0.3·N(0, 1))."""
    pm = get_peft_model(tiny_bert(), lc.LSRConfig(**(CFG | cfg), task_type=task_type))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lsr_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(folder)
    return pm.eval()


def _bank(capacity=2, **cfg):
    return AdapterBank(tiny_bert().bert.eval(), lc.LSRConfig(**(CFG | cfg)), capacity=capacity, prefix=ENCODER)


@torch.no_grad()
def _alone(pms, names, ids):
    """Each sample through the encoder of its own peft model (``"__base__"``: the base encoder)."""
    base = tiny_bert().bert.eval()
    return torch.cat([(base if n == "__base__" else pms[n].base_model.model.bert)(input_ids=ids[i:i + 1])
                      .last_hidden_state for i, n in enumerate(names)])


def _state(bank):
    """Everything a change could touch: slot table, capacity, every buffer and weight of the model."""
    return dict(bank.slots), bank.capacity, {k: v.clone() for k, v in bank.model.state_dict().items()}


def _assert_same_state(bank, before):
    slots, capacity, tensors = _state(bank)
    assert (slots, capacity) == before[:2]
    assert tensors.keys() == before[2].keys()
    for k, v in tensors.items():
        assert torch.equal(v, before[2][k]), k


@pytest.fixture
def two(tmp_path):
    """A bank on the encoder holding adapters "a" and "b" (full: capacity 2), their peft models, and "c" saved."""
    pms = {n: _saved(tmp_path / n, seed) for seed, n in enumerate("abc")}
    bank = _bank()
    for n in "ab":
        bank.load(n, tmp_path / n)
    return bank, pms, tmp_path


# ---- 1. an adapter is served whole or refused ----------------------------------------------------------------

@pytest.mark.parametrize("extra", [["key"], ["key", "intermediate.dense"]])
def test_load_refuses_an_adapter_adapting_layers_the_bank_holds_no_slots_for(tmp_path, extra):
    pm = _saved(tmp_path / "wide", 0, target_modules=["query", "value", *extra])
    bank = _bank()
    before = _state(bank)
    with pytest.raises(ValueError, match="target_modules") as e:
        bank.load("wide", tmp_path / "wide")
    wide = {n.removesuffix(".lsr_A1") for n in load_file(tmp_path / "wide" / "adapter_model.safetensors")
            if n.endswith("lsr_A1") and not any(n.endswith(f"{t}.lsr_A1") for t in ("query", "value"))}
    assert str(tmp_path / "wide") in str(e.value) and wide and all(n in str(e.value) for n in wide)
    _assert_same_state(bank, before)
    # the same adapter, on a bank whose layers cover it, is served as peft serves it
    bank = AdapterBank.from_pretrained(tiny_bert().bert.eval(), {"wide": tmp_path / "wide"}, prefix=ENCODER)
    ids = tokens(3, 6)
    names = ["wide", "__base__", "wide"]
    with torch.no_grad():
        torch.testing.assert_close(bank(names, input_ids=ids).last_hidden_state, _alone({"wide": pm}, names, ids),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("served, prefix, saved", [
    ("model", "base_model.model.", dict(task_type="SEQ_CLS")),  # the classifier is part of the served model
    ("encoder", ENCODER, dict(modules_to_save=["pooler"])),  # the pooler is part of the encoder
])
def test_load_refuses_an_adapter_with_a_trained_module_inside_the_served_model(tmp_path, served, prefix, saved):
    _saved(tmp_path / "head", 0, **saved)
    model = tiny_bert() if served == "model" else tiny_bert().bert
    bank = AdapterBank(model.eval(), lc.LSRConfig(**CFG), capacity=1, prefix=prefix)
    before = _state(bank)
    with pytest.raises(ValueError, match="modules_to_save.*peft") as e:
        bank.load("head", tmp_path / "head")
    assert str(tmp_path / "head") in str(e.value)
    assert ("classifier" if served == "model" else "pooler") in str(e.value)
    _assert_same_state(bank, before)


def test_a_head_outside_the_served_model_is_the_callers_and_the_rest_is_served_as_peft_serves_it(tmp_path):
    """The task head sits above an encoder bank: the encoder's outputs are peft's; on the whole model, an
    adapter without a head gives peft's logits."""
    pm = _saved(tmp_path / "cls", 0, task_type="SEQ_CLS")
    bank = AdapterBank.from_pretrained(tiny_bert().bert.eval(), {"cls": tmp_path / "cls"}, prefix=ENCODER)
    ids = tokens(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(bank(["cls", "__base__"], input_ids=ids).last_hidden_state,
                                   _alone({"cls": pm}, ["cls", "__base__"], ids), atol=1e-5, rtol=1e-5)
    plain = _saved(tmp_path / "plain", 1)
    whole = AdapterBank.from_pretrained(tiny_bert(), {"plain": tmp_path / "plain"})
    with torch.no_grad():
        torch.testing.assert_close(whole(["plain", "plain"], input_ids=ids).logits, plain(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["base_model.model.", "model.", ""])
def test_load_refuses_factors_saved_under_another_prefix_and_names_the_right_one(tmp_path, prefix):
    _saved(tmp_path / "a", 0)
    bank = AdapterBank(tiny_bert().bert.eval(), lc.LSRConfig(**CFG), capacity=1, prefix=prefix)
    with pytest.raises(ValueError, match=f"prefix={ENCODER!r}") as e:
        bank.load("a", tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value) and not bank.slots


def test_load_refuses_factors_outside_the_prefix_even_when_the_banks_layers_are_all_covered(tmp_path):
    _saved(tmp_path / "a", 0)
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    some = next(k for k in state if k.endswith("query.lsr_A1")).removesuffix(".lsr_A1").removeprefix(ENCODER)
    for p in ("A1", "A2", "B1", "B2"):  # the same layer again, under another model's path
        state[f"other.{some}.lsr_{p}"] = state[f"{ENCODER}{some}.lsr_{p}"].clone()
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    bank = _bank()
    with pytest.raises(ValueError, match="another model layout") as e:
        bank.load("a", tmp_path / "a")
    assert f"other.{some}" in str(e.value) and not bank.slots


@pytest.mark.parametrize("other", [dict(s=2), dict(r=(1, 2)), dict(n=(6, 8)), dict(m=(4, 12))])
def test_load_refuses_another_factor_structure_naming_the_folder_and_both_structures(tmp_path, other):
    _saved(tmp_path / "other", 0, **other)
    bank = _bank()
    with pytest.raises(ValueError, match=r"factors s=\d+, r=.*the bank holds s=4, r=\(2, 2\)") as e:
        bank.load("other", tmp_path / "other")
    assert str(tmp_path / "other") in str(e.value) and not bank.slots
    # a config claiming the bank's structure over tensors of another is refused too, naming the folder
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(cfg | dict(s=4, r=[2, 2], n=None, m=None)))
    with pytest.raises(ValueError, match="the bank holds") as e:
        bank.load("other", tmp_path / "other")
    assert str(tmp_path / "other") in str(e.value) and not bank.slots


# ---- 2. changes are all-or-nothing and never reach a batch in flight ------------------------------------------

def _factors(bank, seed):
    g = torch.Generator().manual_seed(seed)
    return {path: [torch.randn(t.shape[1:], generator=g) * 0.3 for t in (l.A1, l.A2, l.B1, l.B2)]
            for path, l in bank.layers.items()}


class _FailsWhenCopied(torch.Tensor):
    """Passes every check and conversion; copying it into a slot fails (a device error, memory)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("injected failure while copying")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", ["a", "c"])  # replace a resident adapter; add one to a full bank (grows)
@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("how", ["shape", "unreadable", "copy"])
def test_a_change_that_fails_on_any_layer_leaves_the_bank_as_it_was(two, name, layer, how):
    bank, pms, _ = two
    ids = tokens(3, 6)
    with torch.no_grad():
        want = bank(["a", "b", "__base__"], input_ids=ids).last_hidden_state
    before = _state(bank)
    factors = _factors(bank, 5)
    path = list(bank.layers)[layer]
    if how == "shape":
        factors[path][2] = factors[path][2][:, :-1]
    elif how == "unreadable":  # passes every check, fails when read (a tensor with no data)
        factors[path][3] = torch.empty(factors[path][3].shape, device="meta")
    else:  # the layers before it, and its own A1, are written when it fails
        factors[path][1] = factors[path][1].as_subclass(_FailsWhenCopied)
    with pytest.raises((ValueError, RuntimeError)):
        bank.add(name, factors, 2.0)
    _assert_same_state(bank, before)
    with torch.no_grad():
        torch.testing.assert_close(bank(["a", "b", "__base__"], input_ids=ids).last_hidden_state, want,
                                   atol=0, rtol=0)
    bank.add(name, _factors(bank, 5), 2.0)  # without the fault it goes through; the others are untouched
    with torch.no_grad():
        got = bank(["b", "__base__", name, "__base__"], input_ids=ids[[1, 2, 0, 0]]).last_hidden_state
    torch.testing.assert_close(got[:2], want[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[2], got[3], atol=1e-3) and not torch.allclose(got[2], want[0], atol=1e-3)


def _in_flight(bank, action, layer=1):
    """Runs ``action()`` from a forward pre-hook on the bank's ``layer``-th layer during one call (first
    time only); returns what it raised (None if nothing)."""
    raised = []

    def hook(module, args):
        if not raised:
            try:
                action()
                raised.append(None)
            except Exception as e:  # the batch goes on: the change must not have reached it
                raised.append(e)
    handle = list(bank.layers.values())[layer].register_forward_pre_hook(hook)
    return raised, handle


@pytest.mark.parametrize("change", ["evict", "replace", "load", "add", "call"])
def test_a_change_from_inside_a_call_is_refused_and_the_batch_is_served_unchanged(two, change):
    bank, pms, folder = two
    ids = tokens(3, 6)
    names = ["a", "b", "__base__"]
    actions = {
        "evict": lambda: bank.evict("a"),
        "replace": lambda: bank.load("a", folder / "c"),
        "load": lambda: bank.load("c", folder / "c"),
        "add": lambda: bank.add("b", _factors(bank, 9), 1.0),
        "call": lambda: bank(["b"], input_ids=ids[:1]),
    }
    before = _state(bank)
    raised, handle = _in_flight(bank, actions[change])
    with torch.no_grad():
        got = bank(names, input_ids=ids).last_hidden_state
    handle.remove()
    assert isinstance(raised[0], RuntimeError) and "serving a batch" in str(raised[0])
    torch.testing.assert_close(got, _alone(pms, names, ids), atol=1e-5, rtol=1e-5)
    _assert_same_state(bank, before)
    actions[change]()  # between calls it goes through


@pytest.mark.parametrize("other", ["evict", "replace", "call"])
def test_a_change_or_call_from_another_thread_waits_for_the_batch_in_flight(two, other, time_limit):
    bank, pms, folder = two
    ids = tokens(3, 6)
    names = ["a", "b", "a"]
    entered, done, model_done = threading.Event(), [], []
    other_ids = tokens(2, 4)

    def second():
        entered.wait()
        if other == "evict":
            bank.evict("a")
        elif other == "replace":
            bank.load("a", folder / "c")
        else:
            with torch.no_grad():
                done.append(bank(["b", "__base__"], input_ids=other_ids).last_hidden_state)
        done.append(time.monotonic())

    def slow(module, args):  # the batch in flight stays inside the model a while
        if not entered.is_set():
            entered.set()
            time.sleep(0.5)
    handles = [next(iter(bank.layers.values())).register_forward_pre_hook(slow),
               bank.model.register_forward_hook(lambda *_: model_done.append(time.monotonic()))]
    thread = threading.Thread(target=second)
    with time_limit(60):
        thread.start()
        with torch.no_grad():
            got = bank(names, input_ids=ids).last_hidden_state
        thread.join(30)
    for h in handles:
        h.remove()
    assert not thread.is_alive() and done and done[-1] > model_done[0]  # it waited, then went through
    torch.testing.assert_close(got, _alone(pms, names, ids), atol=1e-5, rtol=1e-5)
    if other == "call":
        torch.testing.assert_close(done[0], _alone(pms, ["b", "__base__"], other_ids), atol=1e-5, rtol=1e-5)
    else:
        assert ("a" in bank.slots) == (other == "replace")


# ---- 3. errors that say what is wrong -------------------------------------------------------------------------

def test_a_batch_without_adapters_or_without_samples_says_what_is_wrong(tmp_path):
    bank = _bank(capacity=1)  # nothing resident
    ids = tokens(3, 6)
    with torch.no_grad():
        assert torch.equal(bank(["__base__"] * 3, input_ids=ids).last_hidden_state,
                           tiny_bert().bert.eval()(input_ids=ids).last_hidden_state)
    for names, batch in (([], tokens(0, 6)), ([], ids), ("__base__", ids[:1])):
        with pytest.raises(ValueError, match="one adapter name per sample"):
            bank(names, input_ids=batch)
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3 samples"):
        bank(["__base__"] * 2, input_ids=ids)


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_adapter_file_is_named_and_changes_nothing(two, file, damage):
    bank, _, folder = two
    path = folder / "c" / file
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00\xff not a file \x00" * 8,
                      "empty": b""}[damage])
    before = _state(bank)
    for name in ("c", "a"):  # a new adapter; a replacement of a resident one
        with pytest.raises(ValueError, match="corrupt") as e:
            bank.load(name, folder / "c")
        assert str(path) in str(e.value)
        _assert_same_state(bank, before)
    with pytest.raises(ValueError, match="corrupt") as e:
        AdapterBank.from_pretrained(tiny_bert().bert.eval(), {"c": folder / "c"}, prefix=ENCODER)
    assert str(path) in str(e.value)


def test_bank_errors_name_their_cause(two):
    bank, _, folder = two
    with pytest.raises(FileNotFoundError, match="no such folder"):
        bank.load("x", folder / "missing")
    with pytest.raises(ValueError, match="capacity must be an int >= 1, got 0"):
        AdapterBank.from_pretrained(tiny_bert().bert.eval(), {"a": folder / "a"}, capacity=0, prefix=ENCODER)
    factors = _factors(bank, 3)
    factors["pooler.dense"] = factors[next(iter(factors))]
    with pytest.raises(ValueError, match=r"layers the bank does not hold: \['pooler.dense'\]"):
        bank.add("x", factors, 1.0)
    factors = _factors(bank, 3)
    factors[next(iter(factors))].append(torch.randn(2) * 0.3)
    with pytest.raises(ValueError, match="got 5 factors.*the bank holds 4 floating-point"):
        bank.add("x", factors, 1.0)
    with pytest.raises(ValueError, match="__base__"):
        bank.add("__base__", _factors(bank, 3), 1.0)
    _saved(folder / "narrow", 4, target_modules=["query"])
    with pytest.raises(ValueError, match=r"lacks factors for 2 of the bank's layers .*value.*target_modules"):
        bank.load("x", folder / "narrow")
    assert sorted(bank.slots) == ["a", "b"]


# ---- export_lora through a symlink, onto the working directory ------------------------------------------------

def _lora_matches(pm, folder):
    ids = tokens(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_bert(), folder).eval()(input_ids=ids).logits,
                                   pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("held", [False, True])
def test_export_lora_through_a_symlink_writes_the_target_and_keeps_the_link(tmp_path, held):
    pm = _saved(tmp_path / "lsr", 0, task_type="SEQ_CLS")
    target = tmp_path / "store" / "lora"
    target.mkdir(parents=True)
    if held:
        (target / "old.txt").write_text("previous export")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    if held:
        with pytest.raises(FileExistsError, match="overwrite=True"):
            lc.export_lora(pm, link)
        assert (target / "old.txt").read_text() == "previous export"
    lc.export_lora(pm, link, overwrite=held)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not (target / "old.txt").exists() and (target / "adapter_config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora"]  # no staging left behind
    _lora_matches(pm, link)


@pytest.mark.parametrize("out", [".", "..", "./sub/..", "{cwd}"])
def test_export_lora_refuses_the_working_directory_or_a_folder_holding_it(tmp_path, monkeypatch, out):
    pm = _saved(tmp_path / "lsr", 0)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="working directory"):
        lc.export_lora(pm, out.format(cwd=work), overwrite=True)
    assert sorted(p.name for p in work.iterdir()) == ["sub"] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["lsr", "work"]
    assert lc.export_lora(pm, "lora") == (work / "lora").resolve()  # a folder below it is fine
    _lora_matches(pm, work / "lora")
