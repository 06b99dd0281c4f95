import pytest

from lsr_compile import FactorizationError, LSRConfig, factor_pair
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
