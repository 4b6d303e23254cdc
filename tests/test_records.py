"""Records and configuration errors that need no simulator."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rsd_ray.config import DecodeConfig, EnvConfig, EvalConfig, PolicyConfig
from rsd_ray.records.manifest import IncompatibleRunError, build_manifest, check_resumable, stable_hash
from rsd_ray.records.schema import EPISODE_SCHEMA
from rsd_ray.records.writer import CorruptRecordsError, RecordWriter, read_table, recorded_keys

ROOT = Path(__file__).resolve().parents[1]


def episode(key: str, outcome: str = "success") -> dict:
    suite, task, trial = key.split("/")
    return {"run_id": "r", "episode_key": key, "suite": suite, "task_id": int(task), "trial": int(trial),
            "outcome": outcome, "success": outcome == "success"}


def test_parts_append_and_read_back(tmp_path):
    writer = RecordWriter(tmp_path)
    writer.write_episodes([episode("libero_spatial/0/0")])
    writer.write_episodes([episode("libero_spatial/0/1", "timeout"), episode("libero_spatial/1/0", "error")])
    table = read_table(tmp_path)
    assert table.schema.equals(EPISODE_SCHEMA) and table.num_rows == 3
    assert recorded_keys(tmp_path) == {"libero_spatial/0/0", "libero_spatial/0/1", "libero_spatial/1/0"}
    assert not list((tmp_path / "episodes").glob(".*tmp"))       # no temp files left behind


def test_missing_required_field_is_refused(tmp_path):
    row = episode("libero_spatial/0/0")
    del row["outcome"]
    with pytest.raises(ValueError, match="outcome"):
        RecordWriter(tmp_path).write_episodes([row])


def test_corrupt_or_foreign_parquet_names_the_file(tmp_path):
    RecordWriter(tmp_path).write_episodes([episode("libero_spatial/0/0")])
    bad = tmp_path / "episodes" / "part-garbage.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(CorruptRecordsError, match="part-garbage.parquet"):
        read_table(tmp_path)
    bad.unlink()
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"x": [1]}), tmp_path / "episodes" / "part-foreign.parquet")
    with pytest.raises(CorruptRecordsError, match="lacks columns"):
        read_table(tmp_path)


def test_samples_written_before_goal_offsets_read_back_with_nulls(tmp_path):
    """Demonstrations recorded before the goal_offsets column stay usable; any other missing
    column is still a foreign file."""
    import pyarrow.parquet as pq
    from rsd_ray.records.schema import SAMPLE_SCHEMA
    row = {"run_id": "r", "episode_key": "libero_spatial/0/0", "suite": "libero_spatial", "task_id": 0,
           "trial": 0, "chunk_index": 0, "proprio": [0.0] * 8, "action_chunk": [0.0] * 56}
    writer = RecordWriter(tmp_path)
    writer.write_samples([{**row, "goal_offsets": [0.1] * 6}])
    old = read_table(tmp_path, "samples").drop_columns(["goal_offsets"])
    pq.write_table(old, tmp_path / "samples" / "part-old.parquet")
    table = read_table(tmp_path, "samples")
    assert table.schema.equals(SAMPLE_SCHEMA) and table.num_rows == 2
    assert sorted(table.column("goal_offsets").to_pylist(), key=lambda v: v is None)[1] is None
    pq.write_table(old.drop_columns(["proprio"]), tmp_path / "samples" / "part-older.parquet")
    with pytest.raises(CorruptRecordsError, match=r"lacks columns \['proprio'\]"):
        read_table(tmp_path, "samples")


def test_resume_guard_names_the_differences():
    a = build_manifest("r", {}, {"seed": 0}, {"seed": 0, "decode_mode": "speculative"}, {})
    b = build_manifest("r", {}, {"seed": 0}, {"seed": 0, "decode_mode": "autoregressive"}, {})
    check_resumable(a, a)
    with pytest.raises(IncompatibleRunError, match="decode_mode: recorded 'speculative', now 'autoregressive'"):
        check_resumable(a, b)
    assert a["protocol_hash"] == b["protocol_hash"] == stable_hash({"seed": 0})


def test_execute_steps_enters_the_protocol_only_when_it_differs_from_the_whole_chunk():
    """Runs made before env.execute_steps existed executed whole chunks: their protocol must stay
    equal (comparable, resumable) to a default run's, and a shorter horizon must not be."""
    assert "execute_steps" not in EvalConfig().protocol()
    assert EvalConfig(env=EnvConfig(execute_steps=8)).protocol() == EvalConfig().protocol()
    assert EvalConfig(env=EnvConfig(execute_steps=4)).protocol()["execute_steps"] == 4


@pytest.mark.parametrize("make, message", [
    (lambda: EnvConfig(suite="libero-10"), "is not a LIBERO suite"),
    (lambda: EnvConfig(num_trials=51), "50 fixed init states"),
    (lambda: DecodeConfig(acceptance="threshold:1.5"), "threshold:TAU"),
    (lambda: DecodeConfig(draft_layers=8), "draft_layers=8"),
    (lambda: PolicyConfig(kind="rsd", checkpoint="/nonexistent/ckpt"), "is not a directory"),
    (lambda: PolicyConfig(kind="openvla"), "policy.kind='openvla'"),
    (lambda: EnvConfig(execute_steps=9), "env.execute_steps=9"),
    (lambda: EnvConfig(execute_steps=0), "env.execute_steps=0"),
])
def test_config_errors_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "eval_libero.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_configuration_errors_exit_2_with_a_message(tmp_path):
    out = run_job("--env.suite=libero-10")
    assert out.returncode == 2 and "is not a LIBERO suite" in out.stderr
    out = run_job("--env.task_ids=[12]", f"--records.output_dir={tmp_path}")
    assert out.returncode == 2 and "out of range for libero_spatial" in out.stderr
    (tmp_path / "libero_spatial-noop" / "episodes").mkdir(parents=True)
    (tmp_path / "libero_spatial-noop" / "episodes" / "part-x.parquet").write_bytes(b"junk")
    out = run_job("--policy.kind=noop", f"--records.output_dir={tmp_path}")
    assert out.returncode == 2 and "part-x.parquet is not a readable Parquet file" in out.stderr


def test_help_lists_every_field():
    out = run_job("--help")
    assert out.returncode == 0
    for flag in ("--env.suite", "--env.max_steps", "--policy.checkpoint", "--decode.acceptance",
                 "--decode.draft_layers", "--records.output_dir", "--cluster.num_env_actors", "--seed"):
        assert flag in out.stdout


def test_default_policy_is_the_shipped_checkpoint():
    """No policy named: the RSD policy trained in-project (checkpoints/default_policy), found from
    the checkout wherever the job runs, and its config files are there."""
    from rsd_ray.config import DEFAULT_CHECKPOINT, PolicyConfig

    policy = PolicyConfig()
    assert policy.kind == "rsd" and Path(policy.checkpoint) == DEFAULT_CHECKPOINT
    for name in ("rsd_config.json", "training.json", "README.md", "heads.safetensors", "draft.safetensors"):
        assert (DEFAULT_CHECKPOINT / name).is_file(), name


def test_summary_skips_episodes_without_a_latency(tmp_path):
    """An episode that served no chunk has a null latency; the end-of-run table must still print
    (it crashed comparing None with a float when an env actor died mid-run under load)."""
    from rsd_ray.driver import summarize

    writer = RecordWriter(tmp_path)
    writer.write_episodes([episode("libero_spatial/0/0", "timeout"),
                           {**episode("libero_spatial/0/1", "timeout"), "latency_ms_median": 4.5},
                           {**episode("libero_spatial/0/2", "error"), "latency_ms_median": float("nan")}])
    summary = summarize(tmp_path)
    assert (summary.num_episodes, summary.num_timeout, summary.num_error) == (3, 2, 1)
    assert summary.per_task[0]["chunk_ms_median"] == "4.50"
