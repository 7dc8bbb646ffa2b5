"""An in-process communicator: ranks are Python threads, Allgather is a barrier exchange.

It has mpi4py's buffer interface (Get_rank, Get_size, Allgather) and counts the collective
calls of each rank, so tests can check how often SyncBatchNorm communicates.
"""

import threading

import numpy as np

TIMEOUT = 60.0


class ThreadGroup:
    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)
        self.slots = [None] * size
        self.comms = [ThreadComm(self, rank) for rank in range(size)]


class ThreadComm:
    def __init__(self, group, rank):
        self.group = group
        self.rank = rank
        self.allgather_calls = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.group.size

    def Allgather(self, sendbuf, recvbuf):
        group = self.group
        self.allgather_calls += 1
        assert sendbuf.dtype == np.float64 and recvbuf.shape == (group.size, sendbuf.size)
        group.slots[self.rank] = sendbuf.copy()
        group.barrier.wait()
        recvbuf[...] = np.stack(group.slots)
        group.barrier.wait()  # nobody overwrites a slot before everyone has read it


def run_ranks(size, work):
    """Run work(comm) on `size` thread-ranks; return their results (or exceptions) by rank."""
    group = ThreadGroup(size)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = work(group.comms[rank])
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a rank hung"
    return results
