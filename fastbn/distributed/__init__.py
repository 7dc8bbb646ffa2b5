"""Batch normalization across processes: SyncBatchNorm and the exchange it is built on.

Nothing here imports mpi4py until a SyncBatchNorm without an explicit ``comm`` is first used.
"""

from .exchange import (Exchange, PeerError, PeerRuntimeError, PeerTypeError, PeerValueError,
                       mpi_world)
from .sync_batch_norm import SyncBatchNorm

__all__ = ["SyncBatchNorm", "Exchange", "PeerError", "PeerValueError", "PeerTypeError",
           "PeerRuntimeError", "mpi_world"]
