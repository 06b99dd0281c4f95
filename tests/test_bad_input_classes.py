"""Four classes of input that used to get a wrong kind of answer: a configuration that cannot use what it asks
for, a setting that points nowhere, sizes beyond any real layer (minutes of work before an answer), and
training a merged layer."""
import time
import warnings

import pytest
import torch

import lsr_compile as lc
from lsr_compile import config, shipped


@pytest.mark.parametrize("kwargs,d_in,d_out,nearest", [
    (dict(s=4, r=8), 16, 16, "s=4, r=(4, 4)"),  # inner rank beyond the 4 x 4 factors
    (dict(s=4, r=(1, 6), n=(8, 4), m=(8, 4)), 32, 32, "r=(1, 4)"),  # one side only
    (dict(s=40, r=1, n=(2, 3), m=(2, 3)), 6, 6, "s=2"),  # more Kronecker terms than the factors can hold
    # A (1 x 4) needs 2 terms, B (64 x 1) 8: the sums share s, so 8, not 2, is what adds nothing past it
    (dict(s=10, r=1, n=(2, 2), m=(8, 8)), 4, 64, "s=8"),
])
def test_a_configuration_that_cannot_use_what_it_asks_for_warns_with_the_nearest_choice(kwargs, d_in, d_out, nearest):
    config._unusable_warned.clear()
    with pytest.warns(lc.LSRConfigWarning, match=nearest.replace("(", r"\(").replace(")", r"\)")):
        layer = lc.LSRLinear(d_in, d_out, config=lc.LSRConfig(**kwargs))
    x = torch.randn(3, d_in)
    torch.testing.assert_close(layer(x), lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2,
                                                                 layer.B1, layer.B2, layer.scale))
    with warnings.catch_warnings():  # once per shape
        warnings.simplefilter("error")
        lc.LSRLinear(d_in, d_out, config=lc.LSRConfig(**kwargs))


def test_a_usable_configuration_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", lc.LSRConfigWarning)
        lc.LSRLinear(768, 768, config=lc.LSRConfig(s=16, r=2))


def test_a_setting_that_points_nowhere_warns_once_naming_it(tmp_path, monkeypatch, fresh_dispatch):
    nowhere = tmp_path / "no-such-logs"
    monkeypatch.setenv(shipped.ENV_VAR, str(nowhere))
    shipped._warned.clear()
    with pytest.warns(RuntimeWarning, match=f"LSR_TUNING_LOGS names {nowhere}, which does not exist"):
        lc.explain(lc.LSRShape(64, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lc.explain(lc.LSRShape(64, 32, 32))
        from lsr_compile import dispatch
        dispatch.invalidate()
        lc.explain(lc.LSRShape(64, 32, 32))


def test_tvm_artifact_folder_that_points_nowhere_warns(tmp_path, monkeypatch):
    from lsr_compile.kernels import tvm_cuda

    monkeypatch.setenv(tvm_cuda.ENV_VAR, str(tmp_path / "none"))
    shipped._warned.clear()
    with pytest.warns(RuntimeWarning, match="LSR_TVM_ARTIFACTS names"):
        tvm_cuda.artifact_dir()


@pytest.mark.parametrize("call", [
    lambda: lc.LSRShape(8, 10**12, 768),
    lambda: lc.LSRShape(8, 768, 10**18 + 39),
    lambda: lc.LSRShape(10**15, 768, 768),
    lambda: lc.LSRConfig(s=10**9),
    lambda: lc.LSRConfig(r=(2, 10**8)),
    lambda: lc.LSRConfig(n=(10**7, 10**7)).shapes_for(10**14, 16),
    lambda: lc.LSRLinear(10**9, 16),
    lambda: lc.factor_pair(2**61 - 1),
], ids=["d_in", "d_out prime", "tokens", "s", "r", "n", "layer", "factor search"])
def test_sizes_beyond_any_real_layer_are_refused_at_once(call):
    started = time.perf_counter()
    with pytest.raises(ValueError, match="beyond any|at most"):
        call()
    assert time.perf_counter() - started < 1.0


def test_training_a_merged_layer_says_it_is_merged():
    layer = lc.LSRLinear(16, 12, config=lc.LSRConfig(s=2, r=2))
    layer.merge()
    x = torch.randn(4, 16, requires_grad=True)
    with pytest.raises(lc.LSRMergedError, match=r"merged.*unmerge\(\)"):
        layer(x).sum().backward()
    for p in (layer.A1, layer.A2, layer.B1, layer.B2):  # frozen factors: the layer passes gradients through
        p.requires_grad_(False)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 16))
    layer.unmerge()
    for p in (layer.A1, layer.A2, layer.B1, layer.B2):
        p.requires_grad_(True)
    layer(x).sum().backward()  # unmerged: trains
    assert layer.A1.grad is not None


@pytest.mark.parametrize("value", ["never", "off", "Auto", 1, 0, None])
def test_keep_folded_weight_takes_only_what_it_documents(value, monkeypatch):
    """"never", "off" or "Auto" all kept the folded weight (read by their truth value)."""
    from lsr_compile import step

    with pytest.raises(ValueError, match=r"folded_weight_kept got .*keep_folded_weight must be True"):
        with step.folded_weight_kept(value):
            pass
    monkeypatch.setattr(step, "keep_folded_weight", value)
    layer = lc.LSRLinear(64, 48, config=lc.LSRConfig(s=2, r=2))  # 300 rows: the fold forward by default
    x = torch.randn(300, 64, requires_grad=True)
    with pytest.raises(ValueError, match=rf"step.keep_folded_weight is {value!r}; keep_folded_weight must be"):
        layer(x)


@pytest.mark.parametrize("argv,match", [
    (["-r", "1", "2", "3"], r"-r takes one inner rank \(r\) or two \(r1 r2\), got 3: 1 2 3"),
    (["--dtype", "fp32"], r"argument --dtype: invalid choice: 'fp32'"),
    (["-s", "0"], r"separation rank s must be a positive int"),
])
def test_the_command_line_names_an_argument_it_cannot_take(argv, match, capsys):
    """``explain -r 1 2 3`` was explained as r = (1, 1); ``--dtype fp32`` a bare KeyError."""
    from lsr_compile import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "--d-in", "16", "--d-out", "16"] + argv)
    assert e.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"dtype 'fp32' is not one .*known: float32, float64, bfloat16, float16"):
        lc.LSRShape(16, 16, 16, dtype="fp32")


def test_a_layer_describes_the_factors_it_holds_after_they_are_replaced():
    """Factor parameters reassigned with another number of terms: explain, lsr_shape (what tune(model) tunes) and
    the parameter count follow the factors the layer runs (they described the old adapter)."""
    layer = lc.LSRLinear(16, 12, config=lc.LSRConfig(s=2, r=2))
    new = {"A1": (3, 1, 4), "A2": (3, 3, 4), "B1": (3, 4, 1), "B2": (3, 3, 3)}  # s = 3, r = (1, 3)
    for name, shape in new.items():
        setattr(layer, name, torch.nn.Parameter(torch.randn(shape) * 0.5))
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2,
                                                                 layer.B1, layer.B2, layer.scale))
    f = layer.lsr_shape(64).factors
    assert (f.s, f.r1, f.r2, f.n1, f.n2, f.m1, f.m2) == (3, 1, 3, 4, 4, 4, 3)
    assert layer.num_adapter_parameters() == sum(p.numel() for p in (layer.A1, layer.A2, layer.B1, layer.B2)) == 87
    assert "s=3 r=(1,3)" in lc.explain(layer).splitlines()[0]
    assert "s=3, r=(1, 3)" in repr(layer)
    layer.B2 = torch.nn.Parameter(torch.randn(2, 3, 4))  # one factor of another adapter: named, not guessed
    with pytest.raises(ValueError, match=r"'B2': \(2, 3, 4\)\} do not fit together.*assign all four factors"):
        layer.lsr_shape(64)
