"""Killing the driver mid-run and running the same command again yields every key exactly once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsd_ray.records.writer import read_table

pytestmark = [pytest.mark.libero, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]


def test_killed_driver_resumes_to_the_exact_key_set(tmp_path):
    cmd = [sys.executable, str(ROOT / "jobs" / "eval_libero.py"), "--policy.kind=noop",
           "--env.task_ids=[0]", "--env.num_trials=6", "--env.max_steps=24", "--cluster.num_env_actors=2",
           "--cluster.show_progress=false", f"--records.output_dir={tmp_path}", "--records.run_name=run"]
    episodes_dir = tmp_path / "run" / "episodes"
    # Own session, so the kill takes the driver's whole process group (its local Ray included).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(episodes_dir.glob("part-*.parquet")):
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = read_table(tmp_path / "run").column("episode_key").to_pylist()
    assert 1 <= len(first) < 6
    time.sleep(2)     # let the killed Ray's processes go
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = read_table(tmp_path / "run").column("episode_key").to_pylist()
    assert sorted(keys) == [f"libero_spatial/0/{t}" for t in range(6)]
    assert set(first) <= set(keys)
