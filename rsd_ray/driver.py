"""The evaluation driver: episode queue, actors, records, resume, progress and summary.

Usable from `jobs/eval_libero.py` (CLI, `ray job submit`) and from a notebook:

    from rsd_ray.config import EvalConfig, EnvConfig
    from rsd_ray.driver import run_eval
    summary = run_eval(EvalConfig(env=EnvConfig(suite="libero_object", num_trials=5)))
"""
from __future__ import annotations

import collections
import datetime as dt
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsd_ray.config import EvalConfig
from rsd_ray.records.manifest import (
    build_manifest, check_resumable, read_manifest, write_manifest,
)
from rsd_ray.records.schema import EPISODES_DIR
from rsd_ray.records.writer import RecordWriter, read_table, recorded_keys
from rsd_ray.protocol import check_task_ids, episode_key, parse_episode_key


@dataclass
class RunSummary:
    run_dir: Path
    num_episodes: int
    num_success: int
    num_timeout: int
    num_error: int
    num_new: int                     # episodes run by this invocation
    per_task: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""

    @property
    def success_rate(self) -> float:
        return self.num_success / self.num_episodes if self.num_episodes else float("nan")


def episode_seed(run_seed: int, key: str) -> int:
    """Depends only on the run seed and the key: a resumed or re-batched episode gets the same seed."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{key}".encode()).digest()[:4], "little")


def all_keys(config: EvalConfig) -> list[str]:
    env = config.env
    return [episode_key(env.suite, t, trial) for t in check_task_ids(env.suite, env.task_ids)
            for trial in range(env.first_trial, env.first_trial + env.num_trials)]


class TaskAffinityQueue:
    """Pending keys grouped by task, so an actor keeps its task (and its env) while the task
    has trials left; a free actor otherwise takes the task with the most keys that no other
    actor is working on. Retries go to the front of their task."""

    def __init__(self, keys: list[str]):
        self._by_task: dict[tuple[str, int], collections.deque] = collections.OrderedDict()
        for key in keys:
            suite, task_id, _ = parse_episode_key(key)
            self._by_task.setdefault((suite, task_id), collections.deque()).append((key, 1))
        self._actor_task: dict[int, tuple[str, int]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_task.values())

    def push_retry(self, key: str, attempt: int) -> None:
        suite, task_id, _ = parse_episode_key(key)
        self._by_task.setdefault((suite, task_id), collections.deque()).appendleft((key, attempt))

    def pop_for(self, actor: int) -> tuple[str, int] | None:
        task = self._actor_task.get(actor)
        if task is None or not self._by_task.get(task):
            busy = collections.Counter(t for a, t in self._actor_task.items() if a != actor)
            candidates = [t for t, q in self._by_task.items() if q]
            if not candidates:
                return None
            task = max(candidates, key=lambda t: len(self._by_task[t]) / (1 + busy[t]))
            self._actor_task[actor] = task
        return self._by_task[task].popleft()


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep] + ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells])


def summarize(run_dir: Path, num_new: int = 0) -> RunSummary:
    table = read_table(run_dir, EPISODES_DIR).to_pylist()
    per_task: dict[tuple[str, int], dict[str, Any]] = {}
    for row in table:
        t = per_task.setdefault((row["suite"], row["task_id"]), {
            "suite": row["suite"], "task": row["task_id"], "episodes": 0, "success": 0, "timeout": 0,
            "error": 0, "_steps": [], "_lat": []})
        t["episodes"] += 1
        t[row["outcome"]] += 1
        if row["outcome"] == "success":
            t["_steps"].append(row["num_steps"])
        latency = row["latency_ms_median"]
        if latency is not None and latency == latency:     # null (no chunk served) or NaN: no latency
            t["_lat"].append(latency)
    rows = []
    for (_, _), t in sorted(per_task.items()):
        steps, lat = t.pop("_steps"), t.pop("_lat")
        t["success_rate"] = f"{t['success'] / t['episodes']:.1%}"
        t["mean_steps_success"] = f"{sum(steps) / len(steps):.0f}" if steps else "-"
        t["chunk_ms_median"] = f"{sorted(lat)[len(lat) // 2]:.2f}" if lat else "-"
        rows.append(t)
    n = len(table)
    totals = {k: sum(r[k] for r in rows) for k in ("episodes", "success", "timeout", "error")}
    if rows:
        rows.append({"suite": "all", "task": "-", **totals,
                     "success_rate": f"{totals['success'] / max(n, 1):.1%}", "mean_steps_success": "-",
                     "chunk_ms_median": "-"})
    cols = ["suite", "task", "episodes", "success", "timeout", "error", "success_rate", "mean_steps_success",
            "chunk_ms_median"]
    return RunSummary(run_dir=run_dir, num_episodes=n, num_success=totals.get("success", 0),
                      num_timeout=totals.get("timeout", 0), num_error=totals.get("error", 0), num_new=num_new,
                      per_task=rows, table=_format_table(rows, cols) if rows else "(no episodes)")


def prepare_run(config: EvalConfig) -> tuple[Path, dict[str, Any], list[str]]:
    """Validate, write or check the manifest, and return (run_dir, manifest, keys still to run)."""
    from rsd_ray.policy.registry import checkpoint_hash

    keys = all_keys(config)
    run_dir = Path(config.records.output_dir) / config.run_name
    ckpt_hash = checkpoint_hash(config.policy.checkpoint)
    existing = read_manifest(run_dir)
    run_id = existing["run_id"] if existing else f"{config.run_name}-{uuid.uuid4().hex[:8]}"
    manifest = build_manifest(run_id, config.to_dict(), config.protocol(), config.run_identity(ckpt_hash),
                              {"kind": config.policy.kind, "checkpoint": config.policy.checkpoint})
    if existing:
        check_resumable(existing, manifest)
        manifest["created_at"] = existing.get("created_at")
        manifest["resumed_at"] = existing.get("resumed_at", []) + [dt.datetime.now(dt.timezone.utc).isoformat()]
    write_manifest(run_dir, manifest)
    done = recorded_keys(run_dir)
    return run_dir, manifest, [k for k in keys if k not in done]


def run_eval(config: EvalConfig) -> RunSummary:
    run_dir, manifest, pending_keys = prepare_run(config)
    if not pending_keys:
        summary = summarize(run_dir)
        print(f"[rsd_ray] {run_dir}: every episode is already recorded; nothing to run.")
        print(summary.table)
        return summary
    num_new = _run_episodes(config, run_dir, manifest, pending_keys)
    summary = summarize(run_dir, num_new)
    print(f"\n[rsd_ray] run {manifest['run_id']} -> {run_dir}")
    print(summary.table)
    return summary


def _run_episodes(config: EvalConfig, run_dir: Path, manifest: dict[str, Any], keys: list[str]) -> int:
    import ray
    from ray.exceptions import RayActorError, RayError
    from tqdm import tqdm

    from rsd_ray.env.actor import make_env_actor
    from rsd_ray.env.episode import EpisodeRequest
    from rsd_ray.policy.actor import PolicyServer
    from rsd_ray.policy.registry import needs_privileged_state, use_cameras

    cl = config.cluster
    started_ray = False
    envs: list[Any] = []
    policies: list[Any] = []
    if not ray.is_initialized():
        ray.init(address=cl.address, log_to_driver=True, include_dashboard=False) if cl.address else \
            ray.init(include_dashboard=False)
        started_ray = True
    try:
        resources = ray.cluster_resources()
        num_cpus = int(resources.get("CPU", 1))
        num_gpus = resources.get("GPU", 0.0)
        num_env = min(cl.num_env_actors or max(num_cpus, 1), len(keys))
        gpus_per_policy = cl.policy_num_gpus if cl.policy_num_gpus is not None else (1.0 if num_gpus >= 1 else 0.0)
        policy_cls = ray.remote(PolicyServer)
        # Named so operators (and the fault-tolerance tests) can find them: rsd-policy-<i>-<run_id>.
        policy_names = [f"rsd-policy-{i}-{manifest['run_id']}" for i in range(cl.num_policy_actors)]
        policies = [policy_cls.options(name=name, num_cpus=cl.policy_num_cpus,
                                       num_gpus=gpus_per_policy, max_concurrency=1000, max_restarts=3)
                    .remote(config.policy, config.decode) for name in policy_names]
        # Fails fast with the policy's own error (missing checkpoint, bad config) instead of
        # turning every episode into an error row.
        description = ray.get(policies[0].describe.remote())
        manifest["policy"].update(description)
        write_manifest(run_dir, manifest)
        envs = [make_env_actor(config.env, policy_names[i % len(policies)],
                               needs_privileged_state=needs_privileged_state(config.policy),
                               record_chunks=config.records.record_chunks,
                               record_samples=config.records.record_samples != "none",
                               use_cameras=use_cameras(config.env.cameras, config.policy,
                                                       config.records.record_samples != "none"),
                               max_restarts=cl.env_actor_max_restarts, name=f"rsd-env-{i}-{manifest['run_id']}")
                for i in range(num_env)]
        run_fields = {"run_id": manifest["run_id"], "policy_name": description.get("name", config.policy.kind),
                      "decoding_mode": description.get("decoding_mode", "none"),
                      "acceptance": description.get("acceptance", "none"),
                      "draft_layers": config.decode.draft_layers if description.get("decoding_mode") == "speculative" else None,
                      "lossless": bool(description.get("lossless", True)),
                      "checkpoint_hash": manifest["run_identity"]["checkpoint_hash"],
                      "config_hash": manifest["run_hash"]}
        writer = RecordWriter(run_dir)
        queue = TaskAffinityQueue(keys)
        in_flight: dict[Any, tuple[int, str, int]] = {}
        retired: set[int] = set()

        def submit(actor_index: int) -> None:
            item = queue.pop_for(actor_index)
            if item is None:
                return
            key, attempt = item
            request = EpisodeRequest(episode_key=key, attempt=attempt, seed=episode_seed(config.seed, key))
            in_flight[envs[actor_index].run_episode.remote(request)] = (actor_index, key, attempt)

        for i in range(num_env):
            submit(i)
        done_count = successes = 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(keys), desc=f"{config.run_name}", unit="ep", disable=not cl.show_progress,
                   dynamic_ncols=True)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            actor_index, key, attempt = in_flight.pop(ref)
            try:
                result = ray.get(ref)
                episode, chunks, samples = result.episode, result.chunks, result.samples
            except (RayActorError, RayError) as exc:
                # The actor died mid-episode (killed, OOM, segfault in the simulator); Ray restarts it.
                episode = _lost_episode_row(key, attempt, exc)
                chunks, samples = [], []
                if not _await_restart(envs[actor_index], cl.env_actor_restart_timeout_s):
                    retired.add(actor_index)
                    print(f"[rsd_ray] env actor {actor_index} is gone (restarts exhausted, or not back within "
                          f"{cl.env_actor_restart_timeout_s:.0f} s); its episodes go to the others", flush=True)
            if episode["outcome"] == "error" and attempt < cl.max_attempts:
                queue.push_retry(key, attempt + 1)
            else:
                finished = dt.datetime.now(dt.timezone.utc)
                if samples and (config.records.record_samples == "all" or episode["outcome"] == "success"):
                    # Before the episode row: a crash in between re-runs the episode, and
                    # read_samples() drops repeats of a (key, chunk) pair.
                    writer.write_samples([{**s, "run_id": run_fields["run_id"]} for s in samples])
                writer.write_episodes([{**episode, **run_fields, "finished_at": finished}])
                # After the episode row: a crash in between loses this episode's chunk rows
                # (optional detail), never the episode, and never writes them twice.
                if chunks:
                    writer.write_chunks([{**c, "run_id": run_fields["run_id"],
                                          "decoding_mode": run_fields["decoding_mode"],
                                          "acceptance": run_fields["acceptance"]} for c in chunks])
                done_count += 1
                successes += episode["outcome"] == "success"
                minutes = (time.perf_counter() - t0) / 60
                bar.set_postfix(success=f"{successes / done_count:.0%}", ep_per_min=f"{done_count / minutes:.1f}")
                bar.update(1)
            if actor_index not in retired:
                submit(actor_index)
            # A retry queued by a retired actor goes to any live idle one.
            busy = {i for i, _, _ in in_flight.values()}
            for i in range(num_env):
                if i not in retired and i not in busy:
                    submit(i)
            if not in_flight and len(queue):
                raise RuntimeError(
                    f"every env actor is gone (restarts exhausted or not back within "
                    f"{cl.env_actor_restart_timeout_s:.0f} s) with {len(queue)} episodes left; they are not "
                    f"recorded, so rerunning the same command resumes them")
        bar.close()
        # EGL wants env.close() before exit.
        ray.get([actor.close.remote() for i, actor in enumerate(envs) if i not in retired])
        return done_count
    finally:
        # Free the CPUs even when Ray outlives this run (a notebook, a test session).
        for actor in envs + policies:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()


def _await_restart(actor: Any, timeout_s: float, died_grace_s: float = 5.0) -> bool:
    """Blocks until a dead actor answers again; False if it is gone for good. With
    max_task_retries=0, Ray may fail (rather than queue) a call sent while the actor is still
    restarting, so resubmitting at once could burn the episode's next attempt on the restart.
    ActorDiedError means restarts are exhausted; it is trusted only once it persists for
    `died_grace_s`, in case the cluster reports a death before the restart it then makes."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

    start = time.monotonic()
    deadline = start + timeout_s
    delay = 0.1
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            ray.get(actor.pid.remote(), timeout=left)
            return True
        except GetTimeoutError:
            return False
        except RayActorError as exc:        # ActorUnavailableError: still restarting
            if isinstance(exc, ActorDiedError) and time.monotonic() - start > died_grace_s:
                return False
            time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, 2.0)


def _lost_episode_row(key: str, attempt: int, exc: Exception) -> dict[str, Any]:
    suite, task_id, trial = parse_episode_key(key)
    return {"episode_key": key, "suite": suite, "task_id": task_id, "trial": trial, "init_state_index": trial,
            "outcome": "error", "success": False, "num_steps": 0, "num_chunks": 0, "attempt": attempt,
            "error": f"env actor lost: {type(exc).__name__}: {str(exc)[:2000]}"}
