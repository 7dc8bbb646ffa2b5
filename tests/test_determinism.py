"""Bitwise reproducibility: thread counts, the two NCHW schedules, serial vs parallel twins.

The work partition depends on the shape alone and partials merge in a fixed order, so every
way of running a call must give the same bits: compared with array_equal, not allclose. The
float64 saved statistics are the most sensitive witness, since any change in summation order
shows in their last bits.
"""

import numba
import numpy as np
import pytest

import fastbn
import fastbn.kernels.jit
import fastbn._layout
import fastbn.functional
import reference as ref
from conftest import (LARGE_SHAPES, MODULE_FOR_RANK, make_input, make_params, make_running,
                      seeded_rng, shape_id)

try:
    import ml_dtypes
    LOWP_DTYPES = [np.float16, ml_dtypes.bfloat16]
except ImportError:  # the lowp extra is missing: float16 only
    LOWP_DTYPES = [np.float16]

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                       reason="Numba has fewer than 2 threads here")


def run_everything(x, dy, weight, bias, running, channels_last):
    """Every public computation on one input, as a dict of named arrays."""
    running_mean, running_var = (a.copy() for a in running)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, running_mean=running_mean,
                                                running_var=running_var, momentum=0.1,
                                                channels_last=channels_last)
    dx, gw, gb = fastbn.batch_norm_backward(dy, x, mean, invstd, weight,
                                            channels_last=channels_last)
    y_eval = fastbn.batch_norm(x, running[0], running[1], weight, bias, False,
                               channels_last=channels_last)
    eval_invstd = ref.inverse_std(running[1], 1e-5)
    dx_eval, gw_eval, gb_eval = fastbn.batch_norm_backward(
        dy, x, running[0].astype(np.float64), eval_invstd, weight, training=False,
        channels_last=channels_last)
    count, m_mean, m2 = fastbn.channel_moments(x, channels_last=channels_last)
    # The fused BatchNorm + ReLU kernels: forward, backward, eval forward and eval backward.
    y_relu, _, _ = fastbn.batch_norm_relu_forward(x, weight, bias, channels_last=channels_last)
    dx_relu, gw_relu, gb_relu = fastbn.batch_norm_relu_backward(
        dy, x, mean, invstd, weight, bias, channels_last=channels_last)
    y_relu_eval = fastbn.batch_norm_relu(x, running[0], running[1], weight, bias, False,
                                         channels_last=channels_last)
    dx_relu_eval, gw_relu_eval, gb_relu_eval = fastbn.batch_norm_relu_backward(
        dy, x, running[0].astype(np.float64), eval_invstd, weight, bias, training=False,
        channels_last=channels_last)
    return dict(y=y, save_mean=mean, save_invstd=invstd, running_mean=running_mean,
                running_var=running_var, dx=dx, grad_weight=gw, grad_bias=gb, y_eval=y_eval,
                dx_eval=dx_eval, grad_weight_eval=gw_eval, grad_bias_eval=gb_eval, count=count,
                moments_mean=m_mean, moments_m2=m2, y_relu=y_relu, dx_relu=dx_relu,
                grad_weight_relu=gw_relu, grad_bias_relu=gb_relu, y_relu_eval=y_relu_eval,
                dx_relu_eval=dx_relu_eval, grad_weight_relu_eval=gw_relu_eval,
                grad_bias_relu_eval=gb_relu_eval)


def case(shape, dtype, channels_last, seed_key):
    rng = seeded_rng(shape, np.dtype(dtype).name, channels_last, seed_key)
    x = make_input(rng, shape, dtype, channels_last)
    dy = make_input(rng, shape, dtype, channels_last)
    weight, bias = make_params(rng, shape[1], dtype)
    return x, dy, weight, bias, make_running(rng, shape[1], dtype)


def assert_identical(first, second, what):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=f"{what}: {key}")
        assert second[key].dtype == first[key].dtype


@needs_two_threads
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=shape_id)
def test_one_and_two_threads_give_the_same_bits(shape, dtype, channels_last):
    args = case(shape, dtype, channels_last, "threads")
    assert args[0].size >= fastbn.kernels.jit.SERIAL_BELOW_ELEMENTS  # the parallel twins run
    with fastbn.kernels.jit.num_threads(1):
        one = run_everything(*args, channels_last)
    with fastbn.kernels.jit.num_threads(2):
        two = run_everything(*args, channels_last)
    assert_identical(one, two, "1 vs 2 threads")
    # And the bits are right, not only repeatable.
    expected = ref.forward_train(args[0], args[2], args[3], 1e-5, channels_last)
    ref.assert_close(one["save_mean"], expected[1], np.float64, np.max(np.abs(args[0])))


@needs_two_threads
def test_num_threads_restores_the_previous_count():
    before = numba.get_num_threads()
    with fastbn.kernels.jit.num_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with fastbn.kernels.jit.num_threads(2):
            assert numba.get_num_threads() == 2
            raise RuntimeError("inside")
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("shape", [(2, 3, 16384), (2, 9, 16500), (3, 2, 130, 130)],
                         ids=shape_id)
def test_by_channel_and_by_block_schedules_give_the_same_bits(shape, dtype, monkeypatch):
    """Long-plane NCHW only (L >= 16384): short planes and channels-last input have a single
    schedule. The parallel twins are forced (serial calls always take by_block). (2, 9, 16500)
    cuts each plane into two runs of the 16384-value item partition, so partials merge across
    runs too."""
    args = case(shape, dtype, False, "schedule")
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 0)
    asked = []

    def schedule(by_channel):
        def choose(plan):
            asked.append(by_channel)
            return by_channel
        return choose

    monkeypatch.setattr(fastbn.functional, "_schedule_by_channel", schedule(True))
    by_channel = run_everything(*args, False)
    monkeypatch.setattr(fastbn.functional, "_schedule_by_channel", schedule(False))
    by_block = run_everything(*args, False)
    # Both schedules were really chosen, for the forward and the backward.
    assert asked.count(True) >= 2 and asked.count(False) >= 2
    assert_identical(by_channel, by_block, "by_channel vs by_block")


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (37, 5), (6, 3, 9, 10), LARGE_SHAPES[3]],
                         ids=shape_id)
def test_row_kernels_give_the_same_bits_one_or_four_lane_groups_per_step(shape, dtype,
                                                                         monkeypatch):
    """Channels-last lane sums (the forward's moments, the backward's gradient sums) take one
    or four lane groups per step, chosen for speed alone (Plan.interleave_rows); both must add
    in the same order. The shapes leave 1-3 groups over after the last full step of four, and
    (6, 3, 9, 10) has several groups per row."""
    args = case(shape, dtype, True, "interleave")
    asked = []

    def interleave(value):
        def choose(plan, itemsize, n_inputs=1):
            asked.append(value)
            return value
        return choose

    monkeypatch.setattr(fastbn._layout.Plan, "interleave_rows", interleave(True))
    four = run_everything(*args, True)
    monkeypatch.setattr(fastbn._layout.Plan, "interleave_rows", interleave(False))
    one = run_everything(*args, True)
    # forward, training backward and channel_moments
    assert asked.count(True) >= 3 and asked.count(False) >= 3
    assert_identical(four, one, "four vs one lane group per step")


@pytest.mark.parametrize("shape, itemsize, n_inputs, interleave", [
    ((256, 7, 7, 512), 4, 1, False),    # 2 KB groups, 25.7 MB: one group per step
    ((32, 56, 56, 64), 8, 1, False),    # 512 B groups, 51 MB
    ((32, 56, 56, 64), 4, 1, True),     # 256 B groups
    ((16, 28, 28, 1024), 4, 1, True),   # 4 KB groups
    ((8, 7, 7, 512), 4, 1, True),       # 0.8 MB: stays in cache
    ((64, 112, 112, 3), 4, 1, True),    # C = 3: 24-lane groups
    ((32, 56, 56, 64), 4, 2, False),    # dy and x, 51 MB, 256 B groups: one group per step
    ((16, 28, 28, 1024), 4, 2, False),
    ((64, 56, 56, 32), 4, 2, True),     # dy and x, 51 MB, 128 B groups: four per step
    ((32, 56, 56, 16), 8, 2, True),     # float64, 128 B groups
    ((8, 224, 224, 3), 4, 2, True),     # 9.6 MB in all: stays in cache
    ((128, 1024), 4, 2, True),
])
def test_interleaving_is_chosen_by_group_bytes_and_bytes_read(shape, itemsize, n_inputs,
                                                               interleave):
    plan = fastbn._layout.plan_for(shape, True)
    assert plan.interleave_rows(itemsize, n_inputs) is interleave


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 9, 16500), (37, 5), LARGE_SHAPES[0],
                                   LARGE_SHAPES[3]], ids=shape_id)
def test_serial_and_parallel_twins_give_the_same_bits(shape, dtype, channels_last,
                                                      monkeypatch):
    args = case(shape, dtype, channels_last, "twins")
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 1 << 62)
    serial = run_everything(*args, channels_last)
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 0)
    parallel = run_everything(*args, channels_last)
    assert_identical(serial, parallel, "serial vs parallel")


def test_twin_selection_follows_the_threshold(monkeypatch):
    """Guard for the monkeypatching above: select() reads SERIAL_BELOW_ELEMENTS per call."""
    pair = fastbn.kernels.jit.KernelPair.__new__(fastbn.kernels.jit.KernelPair)
    pair.parallel, pair.serial = "parallel", "serial"
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 100)
    assert pair.select(99) == "serial"
    assert pair.select(100) == "parallel"
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 0)
    assert pair.select(1) == "parallel"


def test_repeated_calls_give_the_same_bits(dtype, channels_last):
    """Workspaces are reused between calls; nothing from one call may leak into the next."""
    shape = (4, 6, 5, 3)
    args = case(shape, dtype, channels_last, "repeat")
    first = run_everything(*args, channels_last)
    # A different shape and input in between, sharing the thread's workspace cache.
    other = case((4, 6, 2, 3), dtype, channels_last, "other")
    run_everything(*other, channels_last)
    assert_identical(first, run_everything(*args, channels_last), "repeat")


@needs_two_threads
def test_module_training_is_reproducible_across_thread_counts(channels_last):
    """Several training steps and a backward: identical module state with 1 and 2 threads."""
    shape = LARGE_SHAPES[2]
    results = []
    for threads in (1, 2):
        module = MODULE_FOR_RANK[len(shape)](shape[1], channels_last=channels_last)
        rng = np.random.default_rng(20240611)
        with fastbn.kernels.jit.num_threads(threads):
            for _ in range(3):
                y = module(make_input(rng, shape, np.float32, channels_last))
            dx = module.backward(make_input(rng, shape, np.float32, channels_last))
        results.append(dict(y=y, dx=dx, grad_weight=module.grad_weight,
                            grad_bias=module.grad_bias, **module.state_dict()))
    assert_identical(results[0], results[1], "module, 1 vs 2 threads")


def lowp_case(shape, dtype, channels_last, seed_key):
    """16-bit x and dy with the float32 parameters and buffers of mixed precision."""
    rng = seeded_rng(shape, np.dtype(dtype).name, channels_last, seed_key)
    x = make_input(rng, shape, np.float64, channels_last).astype(dtype)
    dy = make_input(rng, shape, np.float64, channels_last).astype(dtype)
    weight, bias = make_params(rng, shape[1], np.float32)
    return x, dy, weight, bias, make_running(rng, shape[1], np.float32)


@needs_two_threads
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("lowp", LOWP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_lowp_bits_do_not_depend_on_threads_or_twins(shape, lowp, channels_last, monkeypatch):
    """float16 and bfloat16 through every kernel family: 1 and 2 threads, and the serial
    twins, give the same bits."""
    args = lowp_case(shape, lowp, channels_last, "lowp")
    with fastbn.kernels.jit.num_threads(1):
        one = run_everything(*args, channels_last)
    with fastbn.kernels.jit.num_threads(2):
        two = run_everything(*args, channels_last)
    assert_identical(one, two, "1 vs 2 threads")
    monkeypatch.setattr(fastbn.kernels.jit, "SERIAL_BELOW_ELEMENTS", 1 << 62)
    assert_identical(one, run_everything(*args, channels_last), "serial vs parallel")
    assert one["y"].dtype == one["dx"].dtype == lowp
