"""The one collective of a SyncBatchNorm step: gather every rank's partials, with its status.

Works over any communicator with mpi4py's buffer interface: ``Get_rank()``, ``Get_size()`` and
``Allgather(sendbuf, recvbuf)`` on float64 NumPy arrays (an mpi4py ``Comm``, or the
torch.distributed adapter in fastbn.torch). Each rank contributes one float64 row: a status
slot, then its payload. A rank whose local work raised still joins the same collective with a
nonzero status, so no rank waits forever for a peer that gave up; afterwards every rank knows
who failed and raises. Rows are combined in rank order on every rank, so all ranks get the same
bits, however the collective is implemented and whatever each rank's thread count.
"""

import numpy as np

from ..functional import merge_moments

__all__ = ["Exchange", "PeerError", "PeerValueError", "PeerTypeError", "PeerRuntimeError",
           "mpi_world"]

# Status slot values: 0 is success, the others say which kind of error the rank raised.
_OK, _VALUE_ERROR, _TYPE_ERROR, _OTHER_ERROR = 0.0, 1.0, 2.0, 3.0


class PeerError(Exception):
    """Raised on the ranks whose own input was fine when another rank's failed.

    ``ranks`` lists the failing ranks. It is also a ValueError, TypeError or RuntimeError,
    matching the first failing rank's own error, so the same ``except`` clause catches it on
    every rank and the ranks stay in step.
    """

    def __init__(self, message, ranks):
        super().__init__(message)
        self.ranks = tuple(ranks)


class PeerValueError(PeerError, ValueError):
    pass


class PeerTypeError(PeerError, TypeError):
    pass


class PeerRuntimeError(PeerError, RuntimeError):
    pass


_PEER_ERRORS = {_VALUE_ERROR: (PeerValueError, "ValueError"),
                _TYPE_ERROR: (PeerTypeError, "TypeError"),
                _OTHER_ERROR: (PeerRuntimeError, "an error")}


def _status_of(exc):
    if isinstance(exc, ValueError):
        return _VALUE_ERROR
    if isinstance(exc, TypeError):
        return _TYPE_ERROR
    return _OTHER_ERROR


def mpi_world():
    """mpi4py's COMM_WORLD, imported on first use so that ``import fastbn`` never loads MPI."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError("SyncBatchNorm without an explicit comm needs mpi4py; install the "
                          "extra with: pip install 'fastbn[mpi]' (mpi4py and mpich from PyPI)"
                          ) from exc
    return MPI.COMM_WORLD


class Exchange:
    """Gathers one float64 row per rank with a single Allgather per call."""

    __slots__ = ("comm", "rank", "size", "bytes_sent")

    def __init__(self, comm):
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.bytes_sent = 0  # what this rank has contributed so far, for cost accounting

    def gather(self, what, payload_size, local):
        """Run ``local()``, gather the rows of all ranks, and return ``(result, rows)``.

        ``local`` returns ``(result, payload)`` with payload a float64 vector of payload_size
        values, the same size on every rank. If it raises, this rank still joins the
        collective, flagged as failed, and then re-raises its own exception; the other ranks
        raise a PeerError naming it. ``rows`` is the (size, payload_size) array of all
        payloads, row r from rank r. ``what`` names the step in error messages.
        """
        send = np.zeros(payload_size + 1, np.float64)
        error = None
        result = None
        try:
            result, payload = local()
            send[1:] = payload
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the peers
            error = exc
            send[0] = _status_of(exc)
        received = np.empty((self.size, payload_size + 1), np.float64)
        self.comm.Allgather(send, received)
        self.bytes_sent += send.nbytes
        if error is not None:
            raise error
        status = received[:, 0]
        if status.any():
            failed = np.flatnonzero(status != _OK)
            cls, kind = _PEER_ERRORS.get(status[failed[0]], _PEER_ERRORS[_OTHER_ERROR])
            names = ", ".join(str(r) for r in failed)
            plural = "s" if failed.size > 1 else ""
            raise cls(f"{what} failed on rank{plural} {names} of {self.size} ({kind} there); "
                      f"rank {self.rank}'s own input was fine, and no rank changed its state",
                      failed.tolist())
        return result, received[:, 1:]

    # ------------------------------------------------------------------ payloads

    @staticmethod
    def moments_payload(count, mean, m2):
        """A rank's forward row: its count per channel (one value), then mean and M2."""
        return np.concatenate(([float(count)], mean, m2))

    @staticmethod
    def merged_moments(rows):
        """Merge the gathered forward rows in rank order: ``(count, mean, m2)``, count a float.

        An empty shard (count 0) changes nothing: merging it is exact.
        """
        n_channels = (rows.shape[1] - 1) // 2
        counts = np.repeat(rows[:, :1], n_channels, axis=1)
        count, mean, m2 = merge_moments(counts, rows[:, 1:1 + n_channels],
                                        rows[:, 1 + n_channels:])
        return float(count[0]), mean, m2

    @staticmethod
    def summed(rows):
        """The gathered rows added up in rank order (never a tree whose shape could vary)."""
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        return total
