"""The run's leftover-process report (tests/leftovers.py) finds what a run started and nothing else."""

import os
import subprocess
import sys
import uuid

import pytest

from tests.leftovers import RUN_MARKER, end, outlived, processes_of_run

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")


def test_a_process_of_the_run_is_found_until_it_is_ended_and_others_are_not():
    run = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleeper, env={**os.environ, RUN_MARKER: run}, start_new_session=True)
    other = subprocess.Popen(sleeper, env={**os.environ, RUN_MARKER: "another run"}, start_new_session=True)
    try:
        found = outlived(run, exclude={os.getpid()}, grace_s=0.5)
        assert list(found) == [ours.pid] and "time.sleep(60)" in found[ours.pid]
        end(list(found))
        ours.wait(10)
        assert processes_of_run(run, exclude={os.getpid()}) == {}  # reaped: gone; a zombie would not count
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()
