"""Numba's on-disk cache of the kernels: an index that an older fastbn wrote must not break a
newer one.

Numba unpickles a kernel's cache index before it checks whether the index is stale. An index
whose signatures name a class that has since left fastbn (as the storage-format type did) would
raise AttributeError on every call; fastbn.kernels.jit discards such an index instead.
"""

import os
import pickle
import subprocess
import sys
import textwrap

import numba

RUN = textwrap.dedent("""
    import numpy as np
    import fastbn
    x = np.arange(2 * 4 * 8 * 8, dtype=np.float32).reshape(2, 4, 8, 8) / 100
    bn = fastbn.BatchNorm2d(4).eval()
    bn.running_mean[:] = 0.5
    print(float(np.abs(bn(x) - (x - 0.5) / np.sqrt(1 + 1e-5)).max()))
""")


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True,
                          env=env, timeout=600)


def test_an_index_naming_a_removed_class_is_discarded(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    indexes = [os.path.join(root, name) for root, _, names in os.walk(tmp_path)
               for name in names if name.endswith(".nbi")]
    assert indexes, "the run cached no kernel"
    # What an index from an older fastbn unpickles to: a global that no longer exists.
    stale = pickle.dumps(numba.__version__, protocol=-1) + b"cfastbn.kernels.lowp\nGone\n."
    for path in indexes:
        with open(path, "wb") as f:
            f.write(stale)
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr
    assert float(second.stdout.split()[-1]) < 1e-6
    # The stale index was replaced by one that loads.
    third = _run(tmp_path)
    assert third.returncode == 0 and "Gone" not in third.stderr, third.stderr
