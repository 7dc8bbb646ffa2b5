"""Bad input: every case raises a clear error and changes nothing.

Each case runs against a module that has already trained on one batch, so it has non-default
parameters, running statistics, gradients and a saved input. After the error, all of that must
be bit-for-bit what it was, and backward must still give the same gradient as before.
"""

import io
import pickle
import re

import numpy as np
import pytest

import fastbn
from fastbn import functional as F

C = 3


def _rng(*key):
    return np.random.default_rng(list(key) or [0])


def trained(module_cls=fastbn.BatchNorm2d, channels_last=False, shape=(4, C, 5, 6), **kwargs):
    """A module after one training step, with random parameters, plus its input and dy."""
    rng = _rng(len(shape), channels_last)
    bn = module_cls(C, channels_last=channels_last, **kwargs)
    if bn.affine:
        bn.weight[...] = rng.uniform(0.5, 2.0, C)
        bn.bias[...] = rng.standard_normal(C)
    if channels_last:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x = rng.standard_normal(shape).astype(bn.dtype)
    dy = rng.standard_normal(shape).astype(bn.dtype)
    bn(x)
    bn.backward(dy)
    return bn, x, dy


def snapshot(bn, dy):
    """Everything an error must leave alone, plus the gradient backward gives right now."""
    state = {key: (np.copy(value) if isinstance(value, np.ndarray) else value)
             for key, value in vars(bn).items() if key != "_saved"}
    saved = bn._saved
    saved_copy = None if saved is None else tuple(
        np.copy(v) if isinstance(v, np.ndarray) else v for v in saved)
    grads = (None if bn.grad_weight is None else bn.grad_weight.copy(),
             None if bn.grad_bias is None else bn.grad_bias.copy())
    dx = bn.backward(dy) if saved is not None else None
    bn.grad_weight, bn.grad_bias = grads  # backward just rewrote them with equal values
    return state, saved, saved_copy, dx


def assert_unchanged(bn, dy, before):
    state, saved, saved_copy, dx = before
    now = {key: value for key, value in vars(bn).items() if key != "_saved"}
    assert now.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            assert now[key].dtype == value.dtype and np.array_equal(now[key], value), key
        else:
            assert now[key] == value, key
    assert bn._saved is saved
    if saved is not None:
        for kept, copied in zip(bn._saved, saved_copy):
            if isinstance(copied, np.ndarray):
                assert np.array_equal(kept, copied)
        assert np.array_equal(bn.backward(dy), dx)


def raises_and_keeps(bn, dy, action, exc, match):
    before = snapshot(bn, dy)
    with pytest.raises(exc, match=match):
        action()
    assert_unchanged(bn, dy, before)


# ----------------------------------------------------------------------------- input arrays

NOT_FLOAT = [
    (np.int32, "int32"), (np.int64, "int64"), (np.uint8, "uint8"), (np.bool_, "bool"),
    (np.complex64, "complex64"), (np.complex128, "complex128"), (object, "object"),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype,name", NOT_FLOAT, ids=[n for _, n in NOT_FLOAT])
def test_non_float_dtype_is_rejected(dtype, name, channels_last):
    bn, x, dy = trained(channels_last=channels_last)
    raises_and_keeps(bn, dy, lambda: bn(x.astype(dtype)), TypeError,
                     f"must have dtype float32, float64, float16 or bfloat16, got {name}")


@pytest.mark.parametrize("training", [True, False])
def test_string_arrays_and_bytes_are_rejected(training):
    bn, x, dy = trained()
    bn.train(training)
    raises_and_keeps(bn, dy, lambda: bn(np.full(x.shape, "1.5")), TypeError,
                     "float16 or bfloat16, got <U3")
    raises_and_keeps(bn, dy, lambda: bn(np.full(x.shape, b"1")), TypeError,
                     "float16 or bfloat16, got |S1")


@pytest.mark.parametrize("module_cls,bad_shape,expects", [
    (fastbn.BatchNorm1d, (4, C, 2, 2), r"\(N, C\) or \(N, C, L\), got 4D input"),
    (fastbn.BatchNorm1d, (C,), r"\(N, C\) or \(N, C, L\), got 1D input"),
    (fastbn.BatchNorm2d, (C, 5, 6), r"\(N, C, H, W\), got 3D input"),
    (fastbn.BatchNorm2d, (1, 4, C, 5, 6), r"\(N, C, H, W\), got 5D input"),
    (fastbn.BatchNorm3d, (4, C, 5, 6), r"\(N, C, D, H, W\), got 4D input"),
    (fastbn.BatchNorm2d, (), r"\(N, C, H, W\), got 0D input"),
])
def test_wrong_ndim(module_cls, bad_shape, expects):
    shape = {fastbn.BatchNorm1d: (4, C, 5), fastbn.BatchNorm2d: (4, C, 5, 6),
             fastbn.BatchNorm3d: (4, C, 2, 3, 4)}[module_cls]
    bn, x, dy = trained(module_cls, shape=shape)
    raises_and_keeps(bn, dy, lambda: bn(np.zeros(bad_shape, np.float32)), ValueError, expects)


def test_wrong_ndim_names_the_channels_last_shape():
    bn, x, dy = trained(channels_last=True)
    raises_and_keeps(bn, dy, lambda: bn(x[0]), ValueError,
                     r"\(channels_last\) expects input of shape \(N, H, W, C\)")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("got", [1, 2, 4])
def test_wrong_channel_count(channels_last, got):
    bn, x, dy = trained(channels_last=channels_last)
    shape = (4, 5, 6, got) if channels_last else (4, got, 5, 6)
    axis = "last" if channels_last else "1"
    raises_and_keeps(bn, dy, lambda: bn(np.zeros(shape, np.float32)), ValueError,
                     rf"has {got} channels \(axis {axis}\) but {C} were expected")


def test_channels_first_input_to_a_channels_last_module():
    bn, x, dy = trained(channels_last=True)
    raises_and_keeps(bn, dy, lambda: bn(np.moveaxis(x, -1, 1)), ValueError,
                     rf"has 6 channels \(axis last\) but {C} were expected")


def test_float_lists_are_accepted_like_arrays():
    rows = [[0.5, -1.0, 2.0], [1.5, 3.0, -2.0], [0.0, 0.25, 4.0]]
    from_list = fastbn.BatchNorm1d(C, dtype=np.float64)
    from_array = fastbn.BatchNorm1d(C, dtype=np.float64)
    y_list = from_list(rows)
    y_array = from_array(np.array(rows))
    assert y_list.dtype == np.float64
    assert np.array_equal(y_list, y_array)
    assert np.array_equal(from_list.running_var, from_array.running_var)
    assert np.array_equal(from_list.backward(rows), from_array.backward(np.array(rows)))


@pytest.mark.parametrize("data,match", [
    ([[1, 2, 3], [4, 5, 6]], "got int64"),
    ([[True, False, True], [False, True, True]], "got bool"),
    ([[1.0, 2.0, 3.0], [4.0, 5.0]], "np.asarray failed"),
    ([["1", "2", "3"], ["4", "5", "6"]], "got <U1"),
    ([[1.0, None, 3.0], [4.0, 5.0, 6.0]], "got object"),
    ([[1j, 2.0, 3.0], [4.0, 5.0, 6.0]], "got complex128"),
])
def test_lists_that_are_not_float_arrays_are_rejected(data, match):
    bn, x, dy = trained(fastbn.BatchNorm1d, shape=(4, C))
    raises_and_keeps(bn, dy, lambda: bn(data), TypeError, match)


# ----------------------------------------------------------------------------- batch sizes

@pytest.mark.parametrize("module_cls,shape", [
    (fastbn.BatchNorm1d, (1, C)), (fastbn.BatchNorm1d, (1, C, 1)),
    (fastbn.BatchNorm2d, (1, C, 1, 1)), (fastbn.BatchNorm3d, (1, C, 1, 1, 1)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_value_per_channel_when_training(module_cls, shape, channels_last):
    # torch 2.13: ValueError("Expected more than 1 value per channel when training, got input
    # size torch.Size([1, 3]))"
    bn, x, dy = trained(module_cls, channels_last=channels_last,
                        shape=(4, C) + shape[2:])
    if channels_last:
        shape = (1,) + shape[2:] + (C,)
    raises_and_keeps(bn, dy, lambda: bn(np.ones(shape, np.float32)), ValueError,
                     r"Expected more than 1 value per channel when training, got input size")


def test_one_value_per_channel_without_running_stats_fails_in_eval_too():
    bn, x, dy = trained(fastbn.BatchNorm1d, shape=(4, C), track_running_stats=False)
    bn.eval()
    raises_and_keeps(bn, dy, lambda: bn(np.ones((1, C), np.float32)), ValueError,
                     "Expected more than 1 value per channel when training")


def test_one_value_per_channel_is_fine_in_eval():
    bn, x, dy = trained(fastbn.BatchNorm1d, shape=(4, C))
    bn.eval()
    one = np.array([[1.0, 2.0, 3.0]], np.float32)
    expected = ((one - bn.running_mean) / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
                * bn.weight + bn.bias)
    np.testing.assert_allclose(bn(one), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(0, C, 4, 5), (2, C, 0, 5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_does_what_torch_does(shape, channels_last, momentum):
    # torch 2.13: output of the input's shape, running buffers untouched, num_batches_tracked
    # still counts the step; backward gives an empty dx and zero parameter gradients.
    bn, x, dy = trained(channels_last=channels_last, momentum=momentum)
    if channels_last:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    running = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == np.float32
    assert np.array_equal(bn.running_mean, running[0])
    assert np.array_equal(bn.running_var, running[1])
    assert bn.num_batches_tracked == 2
    dx = bn.backward(np.zeros(shape, np.float32))
    assert dx.shape == shape
    assert np.array_equal(bn.grad_weight, np.zeros(C)) and np.array_equal(bn.grad_bias,
                                                                         np.zeros(C))


@pytest.mark.parametrize("shape", [(0, C, 4, 5), (2, C, 5, 0)])
def test_empty_batch_in_eval(shape):
    bn, x, dy = trained()
    bn.eval()
    y = bn(np.zeros(shape, np.float32))
    assert y.shape == shape
    assert bn.num_batches_tracked == 1
    assert bn.backward(np.zeros(shape, np.float32)).shape == shape


@pytest.mark.torch
def test_empty_batch_matches_torch():
    torch = pytest.importorskip("torch")
    for training in (True, False):
        tb = torch.nn.BatchNorm2d(C).train(training)
        fb = fastbn.BatchNorm2d(C).train(training)
        x = torch.zeros(0, C, 2, 2)
        assert tuple(tb(x).shape) == fb(x.numpy()).shape
        assert int(tb.num_batches_tracked) == fb.num_batches_tracked
        assert np.array_equal(tb.running_mean.numpy(), fb.running_mean)
        assert np.array_equal(tb.running_var.numpy(), fb.running_var)


@pytest.mark.torch
def test_one_value_message_matches_torch():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError) as torch_error:
        torch.nn.BatchNorm1d(C)(torch.ones(1, C))
    with pytest.raises(ValueError) as fastbn_error:
        fastbn.BatchNorm1d(C)(np.ones((1, C), np.float32))
    assert str(torch_error.value).split(", got")[0] == str(fastbn_error.value).split(", got")[0]


# ----------------------------------------------------------------------------- out=

@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_out_of_wrong_shape_dtype_or_layout(channels_last):
    bn, x, dy = trained(channels_last=channels_last)
    shape = x.shape
    wrong_shape = shape[:-1] + (shape[-1] + 1,)
    cases = [
        (np.empty(wrong_shape, np.float32), ValueError,
         "out must have shape " + re.escape(str(shape))),
        (np.empty(shape, np.float64), ValueError, "and dtype float32, got shape .* float64"),
        (np.empty(shape, np.float32, order="F"), ValueError, "C-contiguous"),
        (np.empty(shape[:-1] + (2 * shape[-1],), np.float32)[..., ::2], ValueError,
         "C-contiguous"),
        (np.empty(shape, np.int32), ValueError, "dtype float32"),
        (np.zeros(shape, np.float32).tolist(), TypeError, "out must be a numpy.ndarray"),
    ]
    read_only = np.empty(shape, np.float32)
    read_only.flags.writeable = False
    cases.append((read_only, ValueError, "writeable"))
    for training in (True, False):
        bn.train(training)
        for out, exc, match in cases:
            raises_and_keeps(bn, dy, lambda: bn(x, out=out), exc, match)


def test_forward_out_that_overlaps_x():
    bn, x, dy = trained()
    buffer = np.zeros(2 * x.size, np.float32)
    x_in = buffer[:x.size].reshape(x.shape)
    x_in[...] = x
    shifted = buffer[7:7 + x.size].reshape(x.shape)
    for training in (True, False):
        bn.train(training)
        raises_and_keeps(bn, dy, lambda: bn(x_in, out=shifted), ValueError,
                         "out overlaps x in memory")
        raises_and_keeps(bn, dy, lambda: bn(x_in, out=x_in), ValueError,
                         "out must not be x: x is needed intact")
    assert np.array_equal(x_in, x)


def test_functional_out_may_alias_x_exactly_but_not_partially():
    rng = _rng(7)
    x = rng.standard_normal((4, C, 5, 6)).astype(np.float32)
    expected = F.batch_norm_forward(x)[0]
    same = x.copy()
    y = F.batch_norm_forward(same, out=same)[0]
    assert y is same and np.array_equal(y, expected)
    buffer = np.zeros(x.size + 1, np.float32)
    x_in = buffer[1:].reshape(x.shape)
    x_in[...] = x
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    with pytest.raises(ValueError, match="overlaps x"):
        F.batch_norm(x_in, rm, rv, training=True, out=buffer[:-1].reshape(x.shape))
    assert np.array_equal(x_in, x)
    assert np.array_equal(rm, np.zeros(C)) and np.array_equal(rv, np.ones(C))


# ----------------------------------------------------------------------------- backward

def test_backward_before_forward():
    bn = fastbn.BatchNorm2d(C)
    dy = np.ones((2, C, 2, 2), np.float32)
    raises_and_keeps(bn, dy, lambda: bn.backward(dy), RuntimeError,
                     r"backward\(\) called before forward\(\)")


@pytest.mark.parametrize("training", [True, False])
def test_backward_twice_gives_the_same_result(training):
    bn, x, dy = trained()
    bn.train(training)
    bn(x)
    first = bn.backward(dy)
    grads = bn.grad_weight.copy(), bn.grad_bias.copy()
    second = bn.backward(dy)
    assert first is not second
    assert np.array_equal(first, second)
    assert np.array_equal(bn.grad_weight, grads[0]) and np.array_equal(bn.grad_bias, grads[1])


@pytest.mark.parametrize("training", [True, False])
def test_dy_of_wrong_shape_dtype_or_kind(training):
    bn, x, dy = trained()
    bn.train(training)
    bn(x)
    bn.backward(dy)
    raises_and_keeps(bn, dy, lambda: bn.backward(dy[:2]), ValueError,
                     r"dy must have the shape of the last forward input, \(4, 3, 5, 6\)")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy.reshape(4, C, 6, 5)), ValueError,
                     "dy must have the shape")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy.astype(np.float64)), TypeError,
                     "dy must have the dtype of x, float32, got float64")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy.astype(np.int32)), TypeError,
                     "dy must have dtype float32, float64, float16 or bfloat16, got int32")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy.astype(np.float16)), TypeError,
                     "dy must have the dtype of x, float32, got float16")


def test_backward_out_of_wrong_shape_or_overlapping_x():
    bn, x, dy = trained()
    raises_and_keeps(bn, dy, lambda: bn.backward(dy, out=np.empty((4, C, 5, 5), np.float32)),
                     ValueError, "out must have shape")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy, out=np.empty(x.shape, np.float64)),
                     ValueError, "dtype float32")
    raises_and_keeps(bn, dy, lambda: bn.backward(dy, out=bn._saved[0]), ValueError,
                     "out must not be x")


def test_backward_out_may_be_dy():
    bn, x, dy = trained()
    expected = bn.backward(dy)
    grad = dy.copy()
    assert np.array_equal(bn.backward(grad, out=grad), expected)


# ----------------------------------------------------------------------------- state_dict

def _state_cases():
    good = trained()[0].state_dict()
    missing = {k: v for k, v in good.items() if k != "running_var"}
    extra = dict(good, momentum=np.float32(0.1))
    return [
        ("missing key", missing, ValueError, r"missing \['running_var'\], unexpected \[\]"),
        ("extra key", extra, ValueError, r"missing \[\], unexpected \['momentum'\]"),
        ("empty", {}, ValueError, r"missing \['bias', 'num_batches_tracked', 'running_mean', "
                                  r"'running_var', 'weight'\], unexpected \[\]"),
        ("short weight", dict(good, weight=np.ones(C - 1, np.float32)), ValueError,
         r"weight must have shape \(3,\), got \(2,\)"),
        ("2-d running_var", dict(good, running_var=np.ones((C, 1), np.float32)), ValueError,
         r"running_var must have shape \(3,\), got \(3, 1\)"),
        ("scalar bias", dict(good, bias=np.float32(0.0)), ValueError,
         r"bias must have shape \(3,\), got \(\)"),
        ("int running_mean", dict(good, running_mean=np.zeros(C, np.int64)), TypeError,
         "running_mean must hold floating-point values, got int64"),
        ("object weight", dict(good, weight=np.array([1.0, None, 2.0], object)), TypeError,
         "must hold floating-point values, got object"),
        ("float num_batches_tracked", dict(good, num_batches_tracked=np.float64(3.0)),
         ValueError, "num_batches_tracked must be an integer scalar"),
        ("vector num_batches_tracked", dict(good, num_batches_tracked=np.zeros(2, np.int64)),
         ValueError, "num_batches_tracked must be an integer scalar"),
    ]


@pytest.mark.parametrize("name,state,exc,match", _state_cases(),
                         ids=[case[0] for case in _state_cases()])
def test_load_state_dict_rejects_and_changes_nothing(name, state, exc, match):
    bn, x, dy = trained(momentum=0.3)
    raises_and_keeps(bn, dy, lambda: bn.load_state_dict(state), exc, match)


def test_load_state_dict_is_all_or_nothing():
    # weight and bias are valid and would be applied first; running_var is not.
    bn, x, dy = trained()
    state = bn.state_dict()
    state["weight"] = state["weight"] + 5
    state["bias"] = state["bias"] - 5
    state["running_var"] = np.ones(C + 1, np.float32)
    raises_and_keeps(bn, dy, lambda: bn.load_state_dict(state), ValueError, "running_var")


def test_state_dict_keys_follow_affine_and_tracking():
    assert set(fastbn.BatchNorm1d(2, affine=False).state_dict()) == {
        "running_mean", "running_var", "num_batches_tracked"}
    assert set(fastbn.BatchNorm1d(2, track_running_stats=False).state_dict()) == {
        "weight", "bias"}
    with pytest.raises(ValueError, match=r"unexpected \['bias', 'weight'\]"):
        fastbn.BatchNorm1d(2, affine=False).load_state_dict(fastbn.BatchNorm1d(2).state_dict())


def test_state_dict_key_mismatch_is_a_value_error_and_a_key_error():
    # ValueError is the contract; KeyError keeps callers of the earlier behaviour working.
    module = fastbn.BatchNorm1d(2)
    state = dict(module.state_dict(), extra=np.zeros(2))
    with pytest.raises(KeyError, match=r"^state_dict keys do not match: missing \[\], "
                                       r"unexpected \['extra'\]$") as caught:
        module.load_state_dict(state)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, fastbn.modules.StateDictKeyError)


# ----------------------------------------------------------------------------- constructor

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(eps=-1e-5), ValueError, "eps must be a non-negative number, got -1e-05"),
    (dict(eps=float("nan")), ValueError, "eps must be a non-negative number, got nan"),
    (dict(eps=-float("inf")), ValueError, "eps must be a non-negative number"),
    (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\], got nan"),
    (dict(momentum=float("inf")), ValueError, r"momentum must be in \[0, 1\], got inf"),
    (dict(num_features=0), ValueError, "num_features must be at least 1, got 0"),
    (dict(num_features=-2), ValueError, "num_features must be at least 1, got -2"),
    (dict(num_features=2.0), TypeError, "num_features must be an int, got float"),
    (dict(num_features=True), TypeError, "num_features must be an int, got bool"),
    (dict(dtype=np.complex64), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got complex64"),
    (dict(dtype=np.int32), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got int32"),
    (dict(dtype="half-precision"), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got 'half-precision'"),
])
@pytest.mark.parametrize("module_cls", [fastbn.BatchNorm1d, fastbn.BatchNorm2d,
                                        fastbn.BatchNorm3d])
def test_constructor_rejects(module_cls, kwargs, exc, match):
    kwargs = dict(kwargs)
    num_features = kwargs.pop("num_features", C)
    with pytest.raises(exc, match=match):
        module_cls(num_features, **kwargs)


@pytest.mark.parametrize("momentum", [0.0, 1.0, None, 0.5])
def test_constructor_accepts_momentum_bounds_and_none(momentum):
    assert fastbn.BatchNorm2d(C, momentum=momentum).momentum == momentum


def test_functional_rejects_bad_eps_and_momentum_and_keeps_buffers():
    x = _rng(3).standard_normal((4, C, 5)).astype(np.float32)
    rm, rv = np.full(C, 0.25, np.float32), np.full(C, 2.0, np.float32)
    calls = [
        (lambda: F.batch_norm(x, rm, rv, training=True, eps=-1.0), ValueError, "eps"),
        (lambda: F.batch_norm(x, rm, rv, training=False, eps=-1.0), ValueError, "eps"),
        (lambda: F.batch_norm(x, rm, rv, training=True, momentum=1.01), ValueError,
         "momentum"),
        (lambda: F.batch_norm(x, rm, rv, training=True, momentum=-1), ValueError, "momentum"),
        (lambda: F.batch_norm(x[:1, :, :1], rm, rv, training=True), ValueError,
         "more than 1 value"),
        (lambda: F.batch_norm(x, rm[:2], rv, training=True), ValueError,
         r"running_mean must have shape \(3,\)"),
        (lambda: F.batch_norm(x, rm, rv.astype(np.int32), training=True), TypeError,
         "running_var must be a float32 or float64 ndarray"),
        (lambda: F.batch_norm(x, rm, None, training=True), ValueError, "together"),
        (lambda: F.batch_norm(x, rm, rv, np.ones(C + 1, np.float32), training=True),
         ValueError, r"weight must have shape \(3,\)"),
        (lambda: F.batch_norm(x, rm, rv[::-1], training=True), ValueError,
         "writeable and contiguous"),
    ]
    for call, exc, match in calls:
        with pytest.raises(exc, match=match):
            call()
        assert np.array_equal(rm, np.full(C, 0.25)) and np.array_equal(rv, np.full(C, 2.0))


# ----------------------------------------------------------------------------- safety

def test_save_and_load_state_never_unpickle(tmp_path, monkeypatch):
    bn, x, dy = trained(momentum=None)
    bn(x * 3 + 1)
    path = tmp_path / "bn.npz"
    bn.save_state(path)

    def refuse(*args, **kwargs):
        raise AssertionError("fastbn must not unpickle state")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    fresh = fastbn.BatchNorm2d(C, momentum=None)
    fresh.load_state(path)
    for key, value in bn.state_dict().items():
        assert np.array_equal(fresh.state_dict()[key], value), key
    assert fresh.num_batches_tracked == 2

    # The documented plain-NumPy route works the same way.
    plain = io.BytesIO()
    np.savez(plain, **bn.state_dict())
    plain.seek(0)
    other = fastbn.BatchNorm2d(C, momentum=None)
    other.load_state_dict(dict(np.load(plain, allow_pickle=False)))
    assert np.array_equal(other.running_var, bn.running_var)


def test_load_state_refuses_a_file_that_needs_pickle(tmp_path):
    bn, x, dy = trained()
    state = bn.state_dict()
    state["weight"] = np.array([1.0, 2.0, 3.0], object)
    path = tmp_path / "evil.npz"
    np.savez(path, **state)  # an object array can only be stored pickled
    raises_and_keeps(bn, dy, lambda: bn.load_state(path), ValueError, "allow_pickle=False")


class _Tripwire:
    """An element whose conversion methods record that someone ran code from the data."""

    ran = []

    def __float__(self):
        _Tripwire.ran.append("__float__")
        return 1.0

    def __index__(self):
        _Tripwire.ran.append("__index__")
        return 1

    def __reduce__(self):
        _Tripwire.ran.append("__reduce__")
        return (float, (1.0,))


def test_no_code_from_the_data_runs():
    _Tripwire.ran.clear()
    bn, x, dy = trained(fastbn.BatchNorm1d, shape=(4, C))
    evil = np.empty((4, C), object)
    evil[...] = _Tripwire()
    raises_and_keeps(bn, dy, lambda: bn(evil), TypeError, "got object")
    raises_and_keeps(bn, dy, lambda: bn([[_Tripwire()] * C] * 4), TypeError, "got object")
    raises_and_keeps(bn, dy, lambda: bn.backward(evil), TypeError, "got object")
    state = dict(bn.state_dict(), running_mean=evil[0])
    raises_and_keeps(bn, dy, lambda: bn.load_state_dict(state), TypeError, "got object")
    state = dict(bn.state_dict(), num_batches_tracked=np.array(_Tripwire(), object))
    raises_and_keeps(bn, dy, lambda: bn.load_state_dict(state), ValueError,
                     "integer scalar")
    assert _Tripwire.ran == []


def test_the_unchanged_check_notices_a_change():
    bn, x, dy = trained()

    def corrupt(target):
        def action():
            target()
            raise ValueError("boom")
        return action

    changes = [lambda: bn.running_mean.__setitem__(0, 7.0),
               lambda: setattr(bn, "num_batches_tracked", 5),
               lambda: bn.weight.__setitem__(1, -1.0),
               lambda: setattr(bn, "_saved", None),
               lambda: bn._saved[0].__setitem__((0, 0, 0, 0), 9.0)]
    for change in changes:
        bn, x, dy = trained()
        with pytest.raises(AssertionError):
            raises_and_keeps(bn, dy, corrupt(change), ValueError, "boom")


@pytest.mark.parametrize("shape", [(0, C), (0, C, 4), (2, C, 0)])
def test_functional_empty_batch(shape):
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    y = F.batch_norm(np.zeros(shape, np.float32), rm, rv, training=True)
    assert y.shape == shape
    assert np.array_equal(rm, np.full(C, 0.5)) and np.array_equal(rv, np.full(C, 2.0))
    y, save_mean, save_invstd = F.batch_norm_forward(np.zeros(shape, np.float64))
    assert y.shape == shape and save_mean.shape == (C,) and np.isnan(save_invstd).all()
    dx, grad_weight, grad_bias = F.batch_norm_backward(y, y, save_mean, save_invstd)
    assert dx.shape == shape and not grad_weight.any() and not grad_bias.any()
    with pytest.raises(ValueError, match="cannot compute moments of an empty batch"):
        F.channel_moments(np.zeros(shape, np.float32))
