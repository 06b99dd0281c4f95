import time
import warnings

import pytest

import lsr_compile as lc
from lsr_compile import FactorizationError, LSRConfig, factor_pair
from lsr_compile import config
from lsr_compile.config import resolve_shapes


@pytest.mark.parametrize("d,expected", [(768, (32, 24)), (4096, (64, 64)), (11008, (128, 86)),
                                        (14336, (128, 112)), (384, (24, 16)), (3072, (64, 48)), (6, (3, 2))])
def test_factor_pair_is_most_balanced(d, expected):
    assert factor_pair(d) == expected


@pytest.mark.parametrize("d", [769, 7, 2 * 1031])
def test_unsplittable_dimension_names_itself_and_the_fix(d):
    with pytest.raises(FactorizationError) as e:
        factor_pair(d, "d_in")
    msg = str(e.value)
    assert f"d_in = {d}" in msg and "n=(n1, n2)" in msg


def test_explicit_shapes_override_and_are_checked():
    f = resolve_shapes(768, 3072, s=2, r=(2, 3), n=(48, 16), m=None)
    assert (f.n1, f.n2, f.m1, f.m2, f.r1, f.r2) == (48, 16, 64, 48, 2, 3)
    with pytest.raises(FactorizationError, match="does not factor d_in = 768"):
        resolve_shapes(768, 768, s=2, r=2, n=(30, 24))
    with pytest.raises(FactorizationError, match="does not factor d_out = 768"):
        resolve_shapes(768, 768, s=2, r=2, m=(31, 24))


def test_parameter_count_matches_spec_worked_example():
    cfg = LSRConfig(s=16, r=2, n=(32, 24), m=(32, 24), alpha=16.0)
    assert cfg.shapes_for(768, 768).num_params == 3584


@pytest.mark.parametrize("kw,match", [({"init": "kaiming"}, "init"), ({"scaling": "sqrt"}, "scaling"),
                                      ({"s": 0}, "s must be"), ({"r": (2, 0)}, "r must be")])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LSRConfig(**kw)


def test_scaling_rules():
    assert LSRConfig(r=2, alpha=16.0).scale_for(4) == pytest.approx(8.0)  # alpha / r == alpha / sqrt(q)
    assert LSRConfig(r=2, alpha=16.0, scaling="lora").scale_for(4) == pytest.approx(4.0)


def test_lsr_config_for_lora_reads_loras_own_spelling_with_loras_meaning():
    """``r=8`` (LoraConfig's name for the rank) gave r1 = r2 = 8, inner rank 64, and lora_alpha / lora_dropout were a
    bare TypeError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lc.LSRConfigWarning)
        cfg = lc.lsr_config_for_lora(r=8)
    assert cfg.inner_rank == 8 and cfg.r == (4, 2)
    assert lc.lsr_config_for_lora(r=(2, 4)).r == (2, 4)
    with pytest.raises(TypeError, match=r"rank=16 and r=8: give LoRA's rank once"):
        lc.lsr_config_for_lora(16, r=8)
    cfg = lc.lsr_config_for_lora(16, lora_alpha=32, lora_dropout=0.05)
    assert cfg.inner_rank == 16 and cfg.lsr_dropout == 0.05
    assert cfg.scale_for(16) == pytest.approx(32 / 16)  # LoRA's scale, lora_alpha / r
    assert lc.lsr_config_for_lora(16, lora_alpha=32, use_rslora=True).scale_for(16) == pytest.approx(32 / 4)
    with pytest.raises(TypeError, match="lora_alpha .* and alpha .* give one"):
        lc.lsr_config_for_lora(16, lora_alpha=32, alpha=3.0)
    with pytest.raises(TypeError, match="got use_dora, which LSRConfig does not take.*lora_alpha"):
        lc.lsr_config_for_lora(16, use_dora=True)


def test_an_int_in_rank_pattern_is_read_as_r_is():
    """``rank_pattern={"q_proj": 16}`` (peft's meaning: rank 16) gave inner rank 256 without a word: in LSRConfig it
    warns as ``r=16`` does; lsr_config_for_lora reads it as LoRA's rank, as it reads ``rank``."""
    config._rank_warned.clear()
    with pytest.warns(lc.LSRConfigWarning, match=r"rank_pattern\['q_proj'\] = 16 .*inner rank q = 256.*\(4, 4\)"):
        cfg = lc.LSRConfig(r=(4, 2), rank_pattern={"q_proj": 16})
    assert cfg.for_layer("model.q_proj").inner_rank == 256
    with pytest.warns(lc.LSRConfigWarning, match=r"rank_pattern\['k_proj'\] = 8 "):
        lc.LSRConfig(rank_pattern={"k_proj": {"r": 8, "s": 2}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", lc.LSRConfigWarning)
        cfg = lc.lsr_config_for_lora(8, rank_pattern={"q_proj": 16, "v_proj": (2, 2)})
        lc.LSRConfig(r=(4, 2), rank_pattern={"q_proj": 3})
    assert cfg.for_layer("model.q_proj").r == (4, 4) and cfg.for_layer("model.v_proj").inner_rank == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=8, budget=float("inf"), shape=(64, 64)), "budget must be a finite, positive"),
    (dict(rank=8, budget=float("nan"), shape=(64, 64)), "budget must be a finite, positive"),
    (dict(rank=8, budget=0, shape=(64, 64)), "budget must be a finite, positive"),
    (dict(rank=8, budget=0.5, shape=4096), r"shape must be one layer's \(d_in, d_out\)"),
    (dict(rank=10**20), "rank = 100000000000000000000 is beyond any real adapter"),
    (dict(rank=2 * 4099), r"splits at best as r = \(4099, 2\)"),
    (dict(rank=128, shape=(64, 96)), r"rank 128 is above what layer \(64 -> 96\) can carry"),
    (dict(rank=8, rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
], ids=["inf", "nan", "zero", "shape not a pair", "huge", "huge split", "above the layer", "pattern"])
def test_lsr_config_for_lora_refuses_what_it_cannot_mean_at_once(kwargs, match):
    """``budget=inf`` and ``shape=4096`` failed with Python's own errors; ``10**20`` searched for 15 minutes."""
    started = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        lc.lsr_config_for_lora(**kwargs)
    assert time.perf_counter() - started < 1.0
