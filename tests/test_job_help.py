"""Every job's --help renders. Its text is built from the config dataclasses' field comments, and
argparse treats a '%' in help text as a format directive: one comment saying "~35 % cheaper"
once made `train_policy.py --help` die with "%c requires int or char"."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job, flags", [
    ("eval_libero", ("--env.suite", "--decode.acceptance")),
    ("collect_demos", ("--action_noise_std", "--learner")),
    ("train_policy", ("--init_from", "--model.instruction_pool_tokens", "--replace_tasks_from", "--ema_decay")),
    ("train_rfsq", ()),
    ("expert_eval", ("--suite", "--tasks")),
])
def test_job_help_renders_every_flag(job, flags):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    for flag in flags:
        assert flag in out.stdout, flag
