"""SyncBatchNorm and its exchange layer over an in-process communicator (threads as ranks).

Real MPI runs are in test_sync_mpi.py; these check the protocol cheaply: exactly one
collective per training forward and backward and none in eval, errors on every rank when one
rank's input is bad, and equivalence with a plain BatchNorm on the concatenated batch.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastbn
import sync_checks
from fake_comm import run_ranks
from fastbn.distributed import Exchange, PeerError, PeerValueError

TOL = 1e-12
REPO_ROOT = str(Path(__file__).resolve().parents[1])


def check_equivalence(results):
    """Every rank within 1e-12 of scale; grads summed over ranks; identical running stats."""
    for per_rank in zip(*results):
        case = per_rank[0]["case"]
        for rank, result in enumerate(per_rank):
            for name, error in result["errors"].items():
                assert error <= TOL, f"{case} rank {rank}: {name} off by {error:.3g} of scale"
        assert len({result["running"] for result in per_rank}) == 1, f"{case}: running stats"
        for step, grads in enumerate(zip(*(result["grads"] for result in per_rank))):
            for name in ("grad_weight", "grad_bias"):
                total = np.sum([g[name] for g in grads], axis=0)
                error = np.abs(total - grads[0]["plain_" + name]) / np.array(
                    grads[0][name + "_scale"])
                assert np.all(error <= TOL), f"{case} step {step}: sum of {name} {error}"


@pytest.mark.parametrize("size", [1, 3])
def test_matches_plain_batch_norm_on_concatenated_batch(size):
    results = run_ranks(size, lambda comm: sync_checks.equivalence_cases(comm, size))
    for result in results:
        if isinstance(result, BaseException):
            raise result
    check_equivalence(results)


def test_one_collective_per_training_step_none_in_eval():
    def work(comm):
        rng = np.random.default_rng(comm.Get_rank())
        bn = fastbn.SyncBatchNorm(4, comm=comm, dtype=np.float64)
        x = rng.standard_normal((3, 4, 5))
        calls = []
        bn(x)
        calls.append(comm.allgather_calls)
        bn.backward(np.ones_like(x))
        calls.append(comm.allgather_calls)
        bn.eval()
        bn(x)
        bn.backward(np.ones_like(x))
        calls.append(comm.allgather_calls)
        sent = bn.exchange.bytes_sent
        return calls, sent

    for calls, sent in run_ranks(2, work):
        assert calls == [1, 2, 2]
        # 2C + 2 float64 values forward, 2C + 1 backward, with C = 4.
        assert sent == (10 + 9) * 8


def test_eval_without_running_stats_uses_local_batch_and_never_communicates():
    def work(comm):
        rng = np.random.default_rng(comm.Get_rank())
        bn = fastbn.SyncBatchNorm(4, comm=comm, track_running_stats=False, dtype=np.float64)
        bn.eval()
        x = rng.standard_normal((6, 4))
        y = bn(x)
        dx = bn.backward(np.ones_like(x))
        plain = fastbn.BatchNorm1d(4, track_running_stats=False, dtype=np.float64).eval()
        return (comm.allgather_calls, np.array_equal(y, plain(x)),
                np.array_equal(dx, plain.backward(np.ones_like(x))))

    assert run_ranks(2, work) == [(0, True, True)] * 2


@pytest.mark.parametrize("bad_rank", [0, 2])
def test_bad_input_on_one_rank_raises_everywhere_and_changes_nothing(bad_rank):
    results = run_ranks(3, lambda comm: sync_checks.bad_input_cases(comm, bad_rank))
    for rank, report in enumerate(results):
        assert not isinstance(report, BaseException), report
        for step, own in (("channels", "ValueError"), ("dtype", "TypeError"),
                          ("dy_shape", "ValueError")):
            outcome = report[step]
            if rank == bad_rank:
                assert outcome["raised"] == own, (step, outcome)
                assert "PeerError" not in outcome["bases"]
            else:
                assert outcome["raised"] == "Peer" + own, (step, outcome)
                assert own in outcome["bases"] and "PeerError" in outcome["bases"]
                assert f"failed on rank {bad_rank} of 3" in outcome["message"]
        assert report["state_unchanged"] and report["backward_after"]
        assert report["later_step_ok"]


def test_peer_error_names_every_failing_rank():
    def work(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm)
        x = np.zeros((2, 3)) if comm.Get_rank() in (1, 3) else np.zeros((2, 2), np.float32)
        bn(x)

    results = run_ranks(4, work)
    for rank in (0, 2):
        assert isinstance(results[rank], PeerValueError)
        assert results[rank].ranks == (1, 3)
        with pytest.raises(PeerError, match=r"failed on ranks 1, 3 of 4 \(ValueError there\)"):
            raise results[rank]
    for rank in (1, 3):
        assert type(results[rank]) is ValueError
        assert "channels" in str(results[rank])


def test_backward_before_forward_fails_on_every_rank():
    # A rank in training mode without a forward still joins the backward collective, so a
    # peer that did a forward is never left waiting; here none did, and all of them raise.
    def work(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm)
        bn.backward(np.ones((2, 2), np.float32))

    results = run_ranks(2, work)
    assert all(type(r) is RuntimeError for r in results)
    with pytest.raises(RuntimeError, match="before forward"):
        raise results[0]


def test_global_count_of_one_is_an_error_on_every_rank():
    def work(comm):
        bn = fastbn.SyncBatchNorm(2, comm=comm)
        x = np.ones((1, 2), np.float32) if comm.Get_rank() == 0 else np.ones((0, 2), np.float32)
        bn(x)

    results = run_ranks(2, work)
    for result in results:
        with pytest.raises(ValueError, match="more than 1 value per channel .* over all 2 ranks"):
            raise result


def test_exchange_merges_in_rank_order_and_sums_in_rank_order():
    rows = np.array([[0.0, 0.0, 0.0], [4.0, 1.5, 2.0], [2.0, -3.0, 0.5]])
    count, mean, m2 = Exchange.merged_moments(rows)
    expected = fastbn.merge_moments([[0.0], [4.0], [2.0]], rows[:, 1:2], rows[:, 2:])
    assert count == 6.0 and mean[0] == expected[1][0] and m2[0] == expected[2][0]
    values = np.array([[1e16], [1.0], [-1e16]])
    # ((1e16 + 1) - 1e16) in float64 is 0: rank order, not any other association.
    assert Exchange.summed(values)[0] == 0.0


def test_exchange_reports_other_errors_as_runtime_errors():
    def work(comm):
        def local():
            if comm.Get_rank() == 1:
                raise KeyError("boom")
            return None, np.zeros(2)
        return Exchange(comm).gather("step", 2, local)

    results = run_ranks(2, work)
    assert isinstance(results[1], KeyError)
    with pytest.raises(RuntimeError, match=r"step failed on rank 1 of 2 \(an error there\)"):
        raise results[0]
    assert not isinstance(results[0], (ValueError, TypeError))


def test_members_and_state_dict_are_the_batch_norm_modules():
    bn = fastbn.SyncBatchNorm(5, momentum=None, channels_last=True, dtype=np.float64)
    plain = fastbn.BatchNorm2d(5, momentum=None, channels_last=True, dtype=np.float64)
    assert bn.state_dict().keys() == plain.state_dict().keys()
    assert repr(bn) == repr(plain).replace("BatchNorm2d", "SyncBatchNorm")
    assert bn.comm is None
    with pytest.raises(ValueError, match="num_features must be at least 1"):
        fastbn.SyncBatchNorm(0)
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16"):
        fastbn.SyncBatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match=r"SyncBatchNorm \(channels_last\) expects input"):
        bn.eval()(np.zeros((2,)))


def test_import_fastbn_never_imports_mpi4py_and_missing_mpi4py_names_the_extra():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import fastbn
        assert "mpi4py" not in sys.modules, "import fastbn imported mpi4py"
        bn = fastbn.SyncBatchNorm(3)
        assert "mpi4py" not in sys.modules, "the constructor imported mpi4py"
        sys.modules["mpi4py"] = None  # as if it were not installed
        try:
            bn(np.zeros((2, 3), np.float32))
        except ImportError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "pip install 'fastbn[mpi]'" in done.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_rank_gives_batch_norm_bits(dtype, channels_last):
    def work(comm):
        rng = np.random.default_rng(3)
        shape = (6, 5, 7) if not channels_last else (6, 7, 5)
        sync = fastbn.SyncBatchNorm(5, comm=comm, channels_last=channels_last, dtype=dtype)
        plain = fastbn.BatchNorm1d(5, channels_last=channels_last, dtype=dtype)
        outputs = []
        for module in (sync, plain):
            module.weight[...] = rng.uniform(0.5, 1.5, 5)
            x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            outputs.append((module(x), module.backward(dy), module.running_mean,
                            module.running_var, module.grad_weight, module.grad_bias))
            rng = np.random.default_rng(3)
        return outputs

    (sync, plain), = run_ranks(1, work)
    for name, a, b in zip(("y", "dx", "running_mean", "running_var", "grad_weight",
                           "grad_bias"), sync, plain):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
