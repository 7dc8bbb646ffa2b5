"""SyncBatchNorm: batch normalization over a batch split across processes (NumPy, MPI).

A training forward computes this rank's (count, mean, M2) per channel, gathers every rank's in
one Allgather (see exchange), merges them in rank order and normalizes with the global
statistics. A training backward gathers the per-channel sums of dy and dy * (x - mean) in the
same way and computes dx from the global sums. Eval never communicates. Everything else
(members, modes, state_dict, checks) is the BatchNorm modules' own.
"""

import numpy as np

from .. import _validate as V
from .. import phases as P
from ..modules import _BatchNorm
from .exchange import Exchange, mpi_world

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    """Batch normalization with the statistics of the batch of all ranks of ``comm``.

    Takes (N, C, ...) input of 2 to 5 dimensions, or (N, ..., C) with ``channels_last``. Every
    rank of ``comm`` (an mpi4py communicator, ``MPI.COMM_WORLD`` when None, imported on first
    use) must call forward and backward together and in the same mode, as with any collective.

    - Training forward: one Allgather of 2C + 2 float64 values per rank. Shards may differ in
      size and may be empty; every rank gets the same global mean and variance, bit for bit,
      and updates its running statistics identically (with the global unbiased variance).
      "Expected more than 1 value per channel" applies to the global count.
    - Training backward: one Allgather of 2C + 1 float64 values per rank; dx is exact for the
      global batch. ``grad_weight`` and ``grad_bias`` are this rank's *local* contributions, as
      in torch.nn.SyncBatchNorm: all-reduce (sum) them like any other parameter gradient to get
      the gradients of the global batch.
    - Eval: no communication; running statistics, or with ``track_running_stats=False`` the
      rank's local batch statistics (as torch's SyncBatchNorm does).
    - Bad input on some ranks (wrong shape, channel count or dtype; a dy unlike x): every rank
      still joins the collective, then the failing ranks raise their own ValueError or
      TypeError and the others a :class:`~fastbn.distributed.PeerError` of the same kind that
      names the failing ranks. No rank changes its state, so a later backward still
      differentiates the last good forward.
    - A rank that dies outright is MPI's business: the collective on the others does not
      return until the MPI runtime aborts the job (mpiexec kills the remaining ranks when one
      exits with an error), exactly as for any other MPI collective.
    """

    _ndims = (2, 3, 4, 5)
    _shape_doc = ("(N, C, ...) with 0 to 3 spatial dimensions",
                  "(N, ..., C) with 0 to 3 spatial dimensions")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, comm=None, channels_last=False, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         channels_last=channels_last, dtype=dtype)
        self.comm = comm
        self._exchange = None
        # Global values per channel of the last forward if it was synchronized, else None.
        self._sync_count = None

    @property
    def exchange(self):
        """The exchange over ``comm`` (COMM_WORLD when None; mpi4py is imported here)."""
        comm = self.comm if self.comm is not None else mpi_world()
        if self._exchange is None or self._exchange.comm is not comm:
            self._exchange = Exchange(comm)
        return self._exchange

    def __getstate__(self):
        state = super().__getstate__()
        state["_exchange"] = None
        state["_sync_count"] = None
        return state

    # ------------------------------------------------------------------ forward

    def forward(self, x, out=None):
        if not self.training:
            y = super().forward(x, out)
            self._sync_count = None
            return y
        exchange = self.exchange
        n_channels = self.num_features

        def local():
            xv = self._check_input(x)
            if out is not None:
                V.check_no_overlap(V.checked_output(out, xv), xv, "out", "x")
            state = self._checked_state()
            if xv.size == 0:
                zeros = np.zeros(n_channels)
                return (xv, state), exchange.moments_payload(0, zeros, zeros)
            count, mean, m2 = P._channel_moments(xv, self.channels_last)
            return (xv, state), exchange.moments_payload(count[0], mean, m2)

        (x, state), rows = exchange.gather("SyncBatchNorm forward", 2 * n_channels + 1, local)
        count, mean, m2 = exchange.merged_moments(rows)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got 1 "
                             f"value per channel over all {exchange.size} ranks (input size "
                             f"{x.shape} on rank {exchange.rank})")
        weight, bias, running_mean, running_var = state
        update = self.track_running_stats
        if count == 0:  # every shard empty: as BatchNorm on an empty batch
            y = V.checked_output(out, x)
            mean = invstd = np.full(n_channels, np.nan)
        else:
            factor = 0.0
            if update:
                factor = (1.0 / (self.num_batches_tracked + 1) if self.momentum is None
                          else self.momentum)
            # The global unbiased variance updates the running buffers, identically on every
            # rank (they all merged the same rows in the same order).
            invstd = P._merged_stats(count, mean, m2, self.eps, factor,
                                     running_mean if update else None, running_var)
            y = P._normalize(x, mean, invstd, weight, bias, self.channels_last, out)
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, True)
        self._sync_count = count
        return y

    __call__ = forward

    # ------------------------------------------------------------------ backward

    def backward(self, dy, out=None):
        """dx for the last forward; grad_weight and grad_bias are this rank's contributions.

        After a training forward this joins one collective (also when it fails locally, see
        the class docstring); after an eval forward it is local.
        """
        synced = self._sync_count is not None or (self._saved is None and self.training)
        if not synced:
            return super().backward(dy, out)
        exchange = self.exchange
        n_channels = self.num_features

        def local():
            if self._saved is None:
                raise RuntimeError("backward() called before forward(): there is nothing to "
                                   "differentiate")
            x, mean, _, _ = self._saved
            dyv = V.as_float_array(dy, "dy")
            if dyv.shape != x.shape:
                raise ValueError(f"dy must have the shape of the last forward input, {x.shape}, "
                                 f"got {dyv.shape}")
            dyv, _ = P.gradient_args(dyv, x, self.channels_last)
            dx = P.gradient_output(out, dyv, x)
            weight = V.channel_vector(self.weight, n_channels, "weight")
            sums = P._grad_sums(dyv, x, mean, self.channels_last)
            return (dyv, dx, weight, sums), sums.reshape(-1)

        (dy, dx, weight, local_sums), rows = exchange.gather("SyncBatchNorm backward",
                                                             2 * n_channels, local)
        x, mean, invstd, _ = self._saved
        total = exchange.summed(rows).reshape(2, n_channels)
        dx = P._grad_input(dy, x, mean, invstd, weight, total, self._sync_count,
                           self.channels_last, dx)
        if self.affine:
            dtype = self.weight.dtype
            self.grad_weight = (local_sums[1] * invstd).astype(dtype)
            self.grad_bias = local_sums[0].astype(dtype)
        return dx
