"""The evaluator end to end on real LIBERO envs in real Ray actors: records, resume, retries
after a killed actor, error rows for a bad policy."""
from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from rsd_ray.config import ClusterConfig, DecodeConfig, EnvConfig, EvalConfig, PolicyConfig, RecordsConfig
from rsd_ray.driver import run_eval
from rsd_ray.records.manifest import IncompatibleRunError, read_manifest
from rsd_ray.records.schema import CHUNK_SCHEMA, EPISODE_SCHEMA
from rsd_ray.records.writer import read_table

pytestmark = [pytest.mark.libero, pytest.mark.ray]


def config(tmp_path, *, trials=2, max_steps=16, kind="noop", actors=2, **policy) -> EvalConfig:
    return EvalConfig(
        env=EnvConfig(suite="libero_spatial", task_ids=[0], num_trials=trials, max_steps=max_steps),
        policy=PolicyConfig(kind=kind, **policy), decode=DecodeConfig(),
        records=RecordsConfig(output_dir=str(tmp_path), run_name="run"),
        cluster=ClusterConfig(num_env_actors=actors, max_attempts=2, show_progress=False))


def test_records_schema_manifest_and_resume(ray_local, tmp_path):
    cfg = config(tmp_path)
    summary = run_eval(cfg)
    assert summary.num_new == 2 and summary.num_episodes == 2 and summary.num_timeout == 2
    run_dir = tmp_path / "run"
    episodes = read_table(run_dir)
    assert episodes.schema.equals(EPISODE_SCHEMA)
    for part in (run_dir / "episodes").glob("part-*.parquet"):
        assert pq.read_schema(part).equals(EPISODE_SCHEMA, check_metadata=False)
    rows = episodes.to_pylist()
    assert sorted(r["episode_key"] for r in rows) == ["libero_spatial/0/0", "libero_spatial/0/1"]
    assert all(r["outcome"] == "timeout" and r["num_steps"] == 16 and r["attempt"] == 1 for r in rows)
    assert all(r["instruction"].startswith("pick up the black bowl") for r in rows)
    chunks = read_table(run_dir, "chunks")
    assert chunks.schema.equals(CHUNK_SCHEMA) and chunks.num_rows == 4
    manifest = read_manifest(run_dir)
    assert manifest["versions"]["mujoco"] == "2.3.7" and manifest["versions"]["numpy"].startswith("1.")
    assert manifest["config"]["env"]["max_steps"] == 16 and manifest["protocol"]["num_wait_steps"] == 10

    # Same command again: nothing to run. More trials: only the new key runs.
    assert run_eval(cfg).num_new == 0
    more = config(tmp_path, trials=3)
    summary = run_eval(more)
    assert summary.num_new == 1 and summary.num_episodes == 3
    assert sorted(read_table(run_dir).column("episode_key").to_pylist()) == [
        f"libero_spatial/0/{t}" for t in range(3)]

    # A different policy on the same output is refused, naming the difference.
    with pytest.raises(IncompatibleRunError, match="policy_kind"):
        run_eval(config(tmp_path, kind="random"))


def test_bad_policy_output_becomes_error_rows_after_retries(ray_local, tmp_path):
    summary = run_eval(config(tmp_path, trials=1, kind="fault", fault="nan", fault_at_chunk=1, actors=1))
    row = read_table(tmp_path / "run").to_pylist()[0]
    assert summary.num_error == 1 and row["outcome"] == "error" and not row["success"]
    assert row["attempt"] == 2 and "non-finite action" in row["error"]
    assert row["num_steps"] == 8               # the first chunk ran, the second was refused


def kill_env_actor_mid_episode(ray, *, after_batches: int = 3) -> threading.Event:
    """Kills env actor 0 (Ray may restart it) once the policy has served `after_batches` chunks."""
    killed = threading.Event()

    def run():
        deadline = time.time() + 300
        while time.time() < deadline and not killed.is_set():
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            policy = next((n for n in names if n.startswith("rsd-policy-0-")), None)
            env = next((n for n in names if n.startswith("rsd-env-0-")), None)
            if policy and env:
                try:
                    if ray.get(ray.get_actor(policy).stats.remote())["num_batches"] >= after_batches:
                        ray.kill(ray.get_actor(env), no_restart=False)
                        killed.set()
                        return
                except ValueError:
                    pass
            time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()
    return killed


@pytest.mark.parametrize("actors, max_restarts", [
    (1, -1),      # Ray restarts the actor; the episode's retry waits until it answers again
    (2, 0),       # out of restarts: the actor is retired and the other one takes the retry
])
def test_killed_env_actor_costs_a_retry_not_an_episode(ray_local, tmp_path, actors, max_restarts):
    cfg = config(tmp_path, trials=2, max_steps=160, actors=actors)
    cfg.cluster.env_actor_max_restarts = max_restarts
    # 2-3 chunks served: the first of the 20-chunk episodes is running
    killed = kill_env_actor_mid_episode(ray_local, after_batches=4 - actors)
    summary = run_eval(cfg)
    assert killed.wait(timeout=5)
    rows = read_table(tmp_path / "run").to_pylist()
    assert sorted(r["episode_key"] for r in rows) == ["libero_spatial/0/0", "libero_spatial/0/1"]
    assert summary.num_timeout == 2 and summary.num_error == 0, [r["error"] for r in rows]
    assert sorted(r["attempt"] for r in rows) == [1, 2]
    assert all(r["num_steps"] == 160 for r in rows)


def test_no_env_actor_left_stops_the_run_without_recording_the_lost_episode(ray_local, tmp_path):
    cfg = config(tmp_path, trials=1, max_steps=160, actors=1)
    cfg.cluster.env_actor_max_restarts = 0
    killed = kill_env_actor_mid_episode(ray_local, after_batches=2)
    with pytest.raises(RuntimeError, match="every env actor is gone .* 1 episodes left"):
        run_eval(cfg)
    assert killed.wait(timeout=5)
    # Not an error row: the episode never ran to an outcome, so a rerun resumes it.
    assert read_table(tmp_path / "run").num_rows == 0
    cfg.cluster.env_actor_max_restarts = -1
    summary = run_eval(cfg)
    assert summary.num_new == 1 and summary.num_timeout == 1
