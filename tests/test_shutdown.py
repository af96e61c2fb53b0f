"""A local cluster lenscan starts closes without a traceback (lenscan.cluster.connect).

A worker heartbeat still in flight when the worker closes its connection pool used to be logged
as ``Failed to communicate with scheduler during heartbeat`` with a ``CommClosedError``
traceback, on successful runs too. Heartbeats every millisecond make that race likely on every
close; the workers are real processes and write to this test's captured stderr.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(400)

_CLOSE_THREE_TIMES = """
import time
from lenscan.cluster import connect
from lenscan.config import ClusterSpec

def heartbeat_every_ms(dask_worker):
    dask_worker.periodic_callbacks["heartbeat"].callback_time = 1

if __name__ == "__main__":
    for _ in range(3):
        with connect(ClusterSpec(n_workers=3, threads_per_worker=1)) as client:
            client.run(heartbeat_every_ms)
            time.sleep(0.3)
    print("closed")
"""


def test_closing_a_local_cluster_prints_no_heartbeat_traceback(tmp_path):
    script = tmp_path / "close.py"
    script.write_text(_CLOSE_THREE_TIMES)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=360, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr[-3000:]
    assert "during heartbeat" not in done.stderr, done.stderr[-3000:]
    assert "CommClosedError" not in done.stderr, done.stderr[-3000:]
