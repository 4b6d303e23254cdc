"""Runs whole LIBERO episodes by the protocol: one env per task, reused across its trials.

No Ray here: the policy is reached through `policy_client(observation) -> (chunk, stats)`, a
Ray call inside an EnvActor, an in-process call in benchmarks and tests.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rsd_ray.config import EnvConfig
from rsd_ray.env.libero_env import LiberoTaskEnv, TaskSpec, load_task
from rsd_ray.env.preprocess import AGENTVIEW_KEY, WRIST_KEY, policy_image, proprio_state
from rsd_ray.env.privileged import goal_offsets, read_privileged_state
from rsd_ray.policy.base import ChunkStats, Observation, check_chunks
from rsd_ray.protocol import MAX_STEPS, parse_episode_key

PolicyClient = Callable[[Observation], tuple[np.ndarray, ChunkStats]]


@dataclass(frozen=True)
class EpisodeRequest:
    episode_key: str
    attempt: int = 1
    seed: int = 0


@dataclass
class EpisodeResult:
    episode: dict[str, Any]                      # EPISODE_SCHEMA fields known on the env side
    chunks: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)   # SAMPLE_SCHEMA rows, if asked for


class PolicyOutputError(RuntimeError):
    """The policy answered, but not with a finite [T, A] chunk."""


def inline_client(policy: Any) -> PolicyClient:
    """Calls a Policy in this process, one observation at a time (benchmarks, dev harnesses)."""
    def ask(observation: Observation) -> tuple[np.ndarray, ChunkStats]:
        out = policy.predict([observation])
        stats = out.stats[0] if out.stats else ChunkStats()
        return out.chunks[0], stats
    return ask


def encode_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class EpisodeRunner:
    def __init__(self, config: EnvConfig, policy_client: PolicyClient, *, needs_privileged_state: bool = False,
                 record_chunks: bool = True, record_samples: bool = False, use_cameras: bool = True,
                 after_init: Callable[[Any], None] | None = None):
        self.config = config
        self.policy_client = policy_client
        self.needs_privileged_state = needs_privileged_state
        self.record_chunks = record_chunks
        self.record_samples = record_samples
        self.use_cameras = use_cameras
        self.after_init = after_init         # test hook: stage a sim state after the init state
        self.task_env: LiberoTaskEnv | None = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.num_envs_built = 0

    def _env_for(self, suite: str, task_id: int) -> LiberoTaskEnv:
        env = self.task_env
        if env is not None and env.spec.suite == suite and env.spec.task_id == task_id and self.config.reuse_env:
            return env
        self.close()
        spec: TaskSpec = load_task(suite, task_id)
        self.task_env = LiberoTaskEnv(
            spec, render_size=self.config.render_size, num_wait_steps=self.config.num_wait_steps,
            noop_action=self.config.noop_action, skip_unused_renders=self.config.skip_unused_renders,
            soft_reset=self.config.reuse_env, use_cameras=self.use_cameras,
            init_perturbation_m=self.config.init_perturbation_m, init_layout_seed=self.config.init_layout_seed)
        self.num_envs_built += 1
        return self.task_env

    def _observation(self, env: LiberoTaskEnv, raw: dict[str, Any], key: str, chunk_index: int,
                     seed: int) -> Observation:
        size = self.config.image_size
        if self.use_cameras:
            agentview, wrist = policy_image(raw[AGENTVIEW_KEY], size), policy_image(raw[WRIST_KEY], size)
        else:
            agentview = wrist = np.zeros((size, size, 3), np.uint8)
        privileged = None
        if self.needs_privileged_state:
            privileged = read_privileged_state(env.env)
        return Observation(agentview=agentview, wrist=wrist, proprio=proprio_state(raw),
                           instruction=env.spec.instruction, episode_key=key, chunk_index=chunk_index,
                           seed=seed, privileged=privileged)

    def run(self, request: EpisodeRequest) -> EpisodeResult:
        suite, task_id, trial = parse_episode_key(request.episode_key)
        limit = self.config.max_steps if self.config.max_steps is not None else MAX_STEPS[suite]
        t_start = time.perf_counter()
        env_s = reset_s = policy_wait_s = 0.0
        num_steps = num_chunks = 0
        outcome, error = "timeout", ""
        stats_list: list[ChunkStats] = []
        round_trips: list[float] = []
        chunk_rows: list[dict[str, Any]] = []
        sample_rows: list[dict[str, Any]] = []
        spec_info = {"task_name": None, "instruction": None}
        try:
            t0 = time.perf_counter()
            env = self._env_for(suite, task_id)
            spec_info = {"task_name": env.spec.name, "instruction": env.spec.instruction}
            raw = env.start_trial(trial, after_init=self.after_init)
            reset_s = time.perf_counter() - t0
            horizon = self.config.execute_steps
            noise = _ActionNoise(self.config.action_noise_std, task_id, trial, request.seed)
            done = False
            while not done and num_steps < limit:
                obs = self._observation(env, raw, request.episode_key, num_chunks, request.seed)
                t0 = time.perf_counter()
                chunk, stats = self.policy_client(obs)
                rt = time.perf_counter() - t0
                policy_wait_s += rt
                try:
                    chunk = check_chunks(np.asarray(chunk)[None], 1)[0]
                except ValueError as exc:
                    raise PolicyOutputError(f"chunk {num_chunks}: {exc}") from None
                stats_list.append(stats)
                round_trips.append(rt * 1e3)
                start_step, executed = num_steps, 0
                t0 = time.perf_counter()
                for i, action in enumerate(chunk[:horizon]):
                    # Render only the step whose observation becomes the next chunk boundary.
                    is_boundary = i == horizon - 1 and num_steps + 1 < limit
                    raw, _, done, _ = env.step(noise(action.astype(np.float64)), render=is_boundary)
                    num_steps += 1
                    executed += 1
                    if done or num_steps >= limit:
                        break
                env_s += time.perf_counter() - t0
                if self.record_chunks:
                    chunk_rows.append({
                        "episode_key": request.episode_key, "suite": suite, "task_id": task_id, "trial": trial,
                        "attempt": request.attempt, "chunk_index": num_chunks, "step": start_step,
                        "num_actions_executed": executed, "round_trip_ms": rt * 1e3, **_chunk_stat_fields(stats)})
                if self.record_samples and stats.is_demonstration:
                    sample_rows.append({
                        "episode_key": request.episode_key, "suite": suite, "task_id": task_id, "trial": trial,
                        "chunk_index": num_chunks, "step": start_step, "instruction": obs.instruction,
                        "agentview_png": encode_png(obs.agentview), "wrist_png": encode_png(obs.wrist),
                        "proprio": obs.proprio.astype(np.float32).tolist(),
                        "action_chunk": chunk.reshape(-1).tolist(), "num_actions_executed": executed,
                        "goal_offsets": goal_offsets(obs.privileged) if obs.privileged is not None else None})
                num_chunks += 1
            # Success is the env's own check (`done` from step), never "not a timeout".
            outcome = "success" if done else "timeout"
        except Exception as exc:  # noqa: BLE001 - any crash becomes an error row, never a success
            outcome = "error"
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            self.close()          # the env may be in a broken state: rebuild it for the next episode
        latencies = [s.policy_ms for s in stats_list]
        accepted = [s.num_accepted_layers for s in stats_list if s.num_accepted_layers >= 0]
        episode = {
            "episode_key": request.episode_key, "suite": suite, "task_id": task_id, "trial": trial,
            "init_state_index": trial, "seed": request.seed, "outcome": outcome, "success": outcome == "success",
            "num_steps": num_steps, "num_chunks": num_chunks, "wall_s": time.perf_counter() - t_start,
            "env_s": env_s, "reset_s": reset_s, "policy_wait_s": policy_wait_s,
            "latency_ms_mean": statistics.fmean(latencies) if latencies else float("nan"),
            "latency_ms_median": _percentile(latencies, 50), "latency_ms_p90": _percentile(latencies, 90),
            "latency_ms_max": max(latencies) if latencies else float("nan"),
            "round_trip_ms_median": _percentile(round_trips, 50),
            "batch_size_mean": statistics.fmean(s.batch_size for s in stats_list) if stats_list else float("nan"),
            "accepted_layers_mean": statistics.fmean(accepted) if accepted else float("nan"),
            "main_passes_mean": statistics.fmean(s.num_main_passes for s in stats_list) if stats_list else float("nan"),
            "attempt": request.attempt, "error": error, "worker": self.worker, **spec_info,
        }
        for sample in sample_rows:
            sample["episode_success"] = outcome == "success"
        return EpisodeResult(episode=episode, chunks=chunk_rows, samples=sample_rows)

    def close(self) -> None:
        if self.task_env is not None:
            self.task_env.close()
            self.task_env = None


class _ActionNoise:
    """Executed-action noise for DART-style demonstrations (EnvConfig.action_noise_std): only the
    translation dims, clipped to the action range, reproducible per (task, trial, seed)."""

    TRANSLATION_DIMS = slice(0, 3)

    def __init__(self, std: float, task_id: int, trial: int, seed: int):
        self.std = std
        self.rng = np.random.default_rng([task_id, trial, seed, 31337]) if std > 0 else None

    def __call__(self, action: np.ndarray) -> np.ndarray:
        if self.rng is None:
            return action
        noisy = action.copy()
        noisy[self.TRANSLATION_DIMS] += self.rng.normal(0.0, self.std, noisy[self.TRANSLATION_DIMS].shape)
        return np.clip(noisy, -1.0, 1.0)


def _chunk_stat_fields(stats: ChunkStats) -> dict[str, Any]:
    return {"policy_ms": stats.policy_ms, "draft_ms": stats.draft_ms, "verify_ms": stats.verify_ms,
            "step_ms": stats.step_ms, "decode_ms": stats.decode_ms,
            "num_accepted_layers": stats.num_accepted_layers, "num_main_passes": stats.num_main_passes,
            "batch_size": stats.batch_size}
