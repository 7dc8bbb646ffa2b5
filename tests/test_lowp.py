"""float16 and bfloat16 storage: dtypes in and out, and results against the float64 oracle.

The oracle (tests/reference.py) runs in float64 on the very values the 16-bit input holds. An
output may differ from it by one rounding step of its dtype at that value (the final store
rounds once), plus the error of the float32 arithmetic before that store, which PyTorch's
kernels share: a few float32 ulps of the terms that cancel in y = (x - mean) * alpha + beta.
Statistics are float64 whatever the input, so they are held to float64 accuracy.
Parity with torch's own bfloat16/float16 batch norm is in test_lowp_torch.py.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn
import reference as ref
from conftest import LARGE_SHAPES, MODULE_FOR_RANK, make_input, make_params, make_running, \
    physical_shape, seeded_rng, shape_id

ml_dtypes = pytest.importorskip("ml_dtypes")

LOWP = [ml_dtypes.bfloat16, np.float16]
# Small shapes of every rank and the large ones (parallel twins; short planes, long planes and
# rows all appear among them).
SHAPES = [(5, 3), (3, 5, 7), (3, 5, 7, 11), (2, 3, 2, 3, 4)] + LARGE_SHAPES
# float32 arithmetic error, in units of the magnitude of the terms it combines.
FLOAT32_TERMS = 8 * 2.0 ** -24


def lowp_id(dtype):
    return np.dtype(dtype).name


@pytest.fixture(params=LOWP, ids=lowp_id)
def lowp(request):
    return np.dtype(request.param)


def rounding_step(value, dtype):
    """The spacing of dtype's values at |value| (its smallest subnormal spacing near 0)."""
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    _, exponent = np.frexp(np.abs(np.asarray(value, np.float64)))
    exponent = np.maximum(exponent - 1, info.minexp)
    return np.ldexp(1.0, exponent - info.nmant)


def assert_within_rounding(actual, expected, dtype, terms, what):
    """|actual - expected| <= one rounding step of dtype at expected + float32 error of terms."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    actual = np.asarray(actual, np.float64)
    bound = rounding_step(expected, dtype) + FLOAT32_TERMS * terms
    error = np.abs(actual - expected)
    bad = ~(error <= bound) & ~(np.isinf(expected) & (actual == expected))
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} off, worst got "
                           f"{actual[bad][:3]} expected {expected[bad][:3]} bound {bound[bad][:3]}"
                           if np.ndim(bound) else f"{what}: off")


def lowp_case(shape, dtype, channels_last, key):
    rng = seeded_rng(shape, dtype.name, channels_last, key)
    x = make_input(rng, shape, np.float64, channels_last).astype(dtype)
    dy = make_input(rng, shape, np.float64, channels_last).astype(dtype)
    weight, bias = make_params(rng, shape[1], np.float32)
    running = make_running(rng, shape[1], np.float32)
    return x, dy, weight, bias, running


def affine_terms(x, mean, invstd, weight, bias, channels_last):
    """|x - mean| * |alpha| + |beta|-sized magnitudes per element, as x's layout."""
    return np.abs(ref.normalize(x, mean, invstd, np.abs(weight), 0 * bias, channels_last)) + \
        np.abs(ref.normalize(np.zeros_like(x, np.float64), mean, invstd, np.abs(weight),
                             np.abs(bias), channels_last))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_training_forward_and_running_update(shape, lowp, channels_last):
    x, _, weight, bias, (rm, rv) = lowp_case(shape, lowp, channels_last, "train")
    running_mean, running_var = rm.copy(), rv.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, running_mean=running_mean, running_var=running_var, momentum=0.1,
        channels_last=channels_last)
    y_ref, mean, invstd, var_unbiased = ref.forward_train(x, weight, bias, 1e-5, channels_last)
    assert_within_rounding(y, y_ref, lowp, affine_terms(x, mean, invstd, weight, bias,
                                                        channels_last), "y")
    assert save_mean.dtype == save_invstd.dtype == np.float64
    ref.assert_close(save_mean, mean, np.float64, np.max(np.abs(x.astype(np.float64))),
                     "save_mean")
    ref.assert_close(save_invstd, invstd, np.float64, invstd, "save_invstd")
    assert running_mean.dtype == running_var.dtype == np.float32
    ref.assert_close(running_mean, ref.update_running(rm, mean, 0.1), np.float32,
                     np.abs(rm) + np.abs(mean), "running_mean")
    ref.assert_close(running_var, ref.update_running(rv, var_unbiased, 0.1), np.float32,
                     np.abs(rv) + var_unbiased, "running_var")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_eval_forward(shape, lowp, channels_last):
    x, _, weight, bias, (rm, rv) = lowp_case(shape, lowp, channels_last, "eval")
    y = fastbn.batch_norm(x, rm, rv, weight, bias, False, channels_last=channels_last)
    y_ref = ref.forward_eval(x, rm, rv, weight, bias, 1e-5, channels_last)
    invstd = ref.inverse_std(rv, 1e-5)
    assert_within_rounding(y, y_ref, lowp, affine_terms(x, rm, invstd, weight, bias,
                                                        channels_last), "y")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward(shape, lowp, channels_last, training):
    x, dy, weight, bias, (rm, rv) = lowp_case(shape, lowp, channels_last, "backward")
    if training:
        _, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
        expected = ref.backward_train(dy, x, weight, 1e-5, channels_last)
    else:
        mean, invstd = rm.astype(np.float64), ref.inverse_std(rv, 1e-5)
        expected = ref.backward_eval(dy, x, rm, rv, weight, 1e-5, channels_last)
    dx, grad_weight, grad_bias = fastbn.batch_norm_backward(
        dy, x, mean, invstd, weight, training=training, channels_last=channels_last)
    dx_scale, gw_scale, gb_scale = ref.backward_scales(dy, x, mean, invstd, weight,
                                                       channels_last, training)
    assert_within_rounding(dx, expected[0], lowp, dx_scale, "dx")
    assert grad_weight.dtype == grad_bias.dtype == np.float32
    ref.assert_close(grad_weight, expected[1], np.float32, gw_scale, "grad_weight")
    ref.assert_close(grad_bias, expected[2], np.float32, gb_scale, "grad_bias")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_channel_moments_are_float64_exact(shape, lowp, channels_last):
    x, *_ = lowp_case(shape, lowp, channels_last, "moments")
    count, mean, m2 = fastbn.channel_moments(x, channels_last=channels_last)
    count_ref, mean_ref, m2_ref = ref.channel_moments(x, channels_last)
    np.testing.assert_array_equal(count, count_ref)
    scale = np.max(np.abs(x.astype(np.float64)))
    ref.assert_close(mean, mean_ref, np.float64, scale, "mean")
    ref.assert_close(m2, m2_ref, np.float64, count_ref * scale ** 2, "m2")


def test_specials_and_float16_overflow(channels_last):
    """NaN and inf in one channel stay in that channel; an output beyond float16's range is
    inf, as the rounding of the exact value is; other channels are unaffected."""
    shape = (4, 3, 5, 6)
    rng = seeded_rng("specials", channels_last)
    x = make_input(rng, shape, np.float64, channels_last).astype(np.float16)
    cf = np.moveaxis(x, -1, 1) if channels_last else x
    cf[1, 0, 2, 3] = np.nan
    cf[2, 1, 0, 0] = np.inf
    weight = np.array([1.0, 1.0, 3e4], np.float32)  # channel 2 overflows float16 at |xhat| > 2.2
    bias = np.zeros(3, np.float32)
    y, *_ = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
    y_cf = (np.moveaxis(y, -1, 1) if channels_last else y).astype(np.float64)
    assert np.isnan(y_cf[:, 0]).all() and np.isnan(y_cf[:, 1]).all()
    # The oracle meets the same inf and NaN, and its float16 rounding overflows on purpose.
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = ref.forward_train(x, weight, bias, 1e-5, channels_last)[0]
        y_ref_cf = np.moveaxis(y_ref, -1, 1) if channels_last else y_ref
        overflows = np.isinf(y_ref_cf[:, 2].astype(np.float16))
    assert overflows.any() and not overflows.all()
    np.testing.assert_array_equal(np.isinf(y_cf[:, 2]), overflows)


# ----------------------------------------------------------------------------- API

def test_modules_take_lowp_input_with_float32_state(lowp, channels_last):
    shape = (4, 3, 5, 6)
    module = fastbn.BatchNorm2d(3, channels_last=channels_last, dtype=lowp)
    assert module.dtype == lowp
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(module, name).dtype == np.float32
    x, dy, *_ = lowp_case(shape, lowp, channels_last, "module")
    x, dy = x.reshape(physical_shape(shape, channels_last)), dy
    y = module(x)
    dx = module.backward(dy)
    assert y.dtype == dx.dtype == lowp
    assert module.grad_weight.dtype == module.grad_bias.dtype == np.float32
    assert module.running_mean.dtype == np.float32
    # A float32 module takes the same input, as torch's CPU batch norm does, with the same bits.
    plain = fastbn.BatchNorm2d(3, channels_last=channels_last)
    np.testing.assert_array_equal(plain(x).view(np.uint16), y.view(np.uint16))
    np.testing.assert_array_equal(plain.backward(dy).view(np.uint16), dx.view(np.uint16))
    module.eval()
    y_eval = module(x)
    assert y_eval.dtype == lowp and module.backward(dy).dtype == lowp


def test_module_dtype_names():
    assert fastbn.BatchNorm1d(2, dtype="bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)
    assert fastbn.BatchNorm1d(2, dtype="float16").weight.dtype == np.float32
    assert fastbn.BatchNorm1d(2, dtype=np.float64).weight.dtype == np.float64


def test_out_and_dy_must_match_the_input_dtype(lowp):
    x, dy, weight, bias, _ = lowp_case((4, 3, 5), lowp, False, "errors")
    with pytest.raises(ValueError, match=f"out must have shape \\(4, 3, 5\\) and dtype {lowp}"):
        fastbn.batch_norm_forward(x, weight, bias, out=np.empty(x.shape, np.float32))
    out = np.empty_like(x)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, out=out)
    assert y is out
    with pytest.raises(TypeError, match=f"dy must have the dtype of x, {lowp}, got float32"):
        fastbn.batch_norm_backward(dy.astype(np.float32), x, mean, invstd, weight)


def test_without_ml_dtypes_fastbn_imports_and_bfloat16_names_the_extra():
    """A subprocess in which importing ml_dtypes fails, as where the lowp extra is missing."""
    script = textwrap.dedent("""
        import sys
        class BlockMlDtypes:
            def find_spec(self, name, path=None, target=None):
                if name == "ml_dtypes" or name.startswith("ml_dtypes."):
                    raise ImportError("No module named 'ml_dtypes' (blocked by the test)")
        sys.meta_path.insert(0, BlockMlDtypes())
        import numpy as np
        import fastbn
        assert "ml_dtypes" not in sys.modules
        y = fastbn.BatchNorm2d(2, dtype=np.float16)(np.ones((2, 2, 3, 3), np.float16))
        assert y.dtype == np.float16
        try:
            fastbn.BatchNorm2d(2, dtype="bfloat16")
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(fastbn.__file__)), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "ImportError: bfloat16 needs the ml_dtypes package: pip install 'fastbn[lowp]'" \
        in result.stdout


@pytest.mark.parametrize("module_rank", [2, 3, 5])
def test_every_module_rank(module_rank, lowp):
    shape = {2: (6, 4), 3: (3, 4, 5), 5: (2, 4, 2, 3, 3)}[module_rank]
    module = MODULE_FOR_RANK[module_rank](4, dtype=lowp)
    x, dy, *_ = lowp_case(shape, lowp, False, "ranks")
    y = module(x)
    y_ref = ref.forward_train(x, module.weight, module.bias, 1e-5, False)[0]
    assert_within_rounding(y, y_ref, lowp, np.abs(y_ref) + 1.0, "y")


@pytest.mark.parametrize("shape", [(3, 5, 7, 11)] + LARGE_SHAPES, ids=shape_id)
def test_split_phases_give_the_fused_bits(shape, lowp, channels_last):
    """The phases a SyncBatchNorm is built from take 16-bit input as the fused kernels do."""
    x, dy, weight, bias, _ = lowp_case(shape, lowp, channels_last, "phases")
    y_fused, mean, invstd = fastbn.batch_norm_forward(x, weight, bias,
                                                      channels_last=channels_last)
    y = fastbn.batch_norm_normalize(x, mean, invstd, weight, bias, channels_last=channels_last)
    assert y.dtype == lowp
    np.testing.assert_array_equal(y.view(np.uint16), y_fused.view(np.uint16))
    sums = fastbn.batch_norm_grad_sums(dy, x, mean, channels_last=channels_last)
    dx = fastbn.batch_norm_grad_input(dy, x, mean, invstd, sums, x.size // shape[1], weight,
                                      channels_last=channels_last)
    dx_fused, grad_weight, grad_bias = fastbn.batch_norm_backward(
        dy, x, mean, invstd, weight, channels_last=channels_last)
    assert dx.dtype == lowp
    np.testing.assert_array_equal(dx.view(np.uint16), dx_fused.view(np.uint16))
    np.testing.assert_array_equal(sums[0].astype(np.float32), grad_bias)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), LARGE_SHAPES[1], LARGE_SHAPES[4]],
                         ids=shape_id)
def test_fused_relu_is_relu_of_batch_norm_bit_for_bit(shape, lowp, channels_last):
    """The fused ReLU reads and writes 16-bit data like batch norm: y is ReLU of batch norm's
    y, and dx is batch norm's dx of dy masked where that y is not above 0."""
    x, dy, weight, bias, _ = lowp_case(shape, lowp, channels_last, "relu")
    y_bn, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, channels_last=channels_last)
    y, *_ = fastbn.batch_norm_relu_forward(x, weight, bias, channels_last=channels_last)
    assert y.dtype == lowp
    np.testing.assert_array_equal(y.astype(np.float32), np.maximum(y_bn.astype(np.float32), 0))
    dx, grad_weight, grad_bias = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, weight, bias, channels_last=channels_last)
    masked = np.where(y_bn.astype(np.float32) > 0, dy, np.zeros_like(dy))
    dx_bn, grad_weight_bn, grad_bias_bn = fastbn.batch_norm_backward(
        masked, x, mean, invstd, weight, channels_last=channels_last)
    np.testing.assert_array_equal(dx.view(np.uint16), dx_bn.view(np.uint16))
    np.testing.assert_array_equal(grad_weight, grad_weight_bn)
    np.testing.assert_array_equal(grad_bias, grad_bias_bn)


def test_readme_example_runs():
    """The README's low-precision example, exactly as written there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    section = text[text.index("## Low-precision storage"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    code = block[:block.index("```")]
    assert "fastbn.BatchNorm2d(16, dtype=\"bfloat16\")" in code
    exec(compile(code, "README.md", "exec"), {})
