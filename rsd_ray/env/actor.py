"""EnvActor: one LIBERO env in a 1-CPU Ray actor, running whole episodes against a PolicyActor.

Fault tolerance is Ray's: the actor is created with `max_restarts`, so a killed or crashed
process comes back (rebuilding its env on first use); the driver sees the lost call as a
RayActorError and re-queues that episode key with the next attempt number. Nothing is lost and
nothing is counted twice, because only the driver writes records.
"""
from __future__ import annotations

import os
from typing import Any

import ray

from rsd_ray.config import EnvConfig
from rsd_ray.env.episode import EpisodeRequest, EpisodeResult, EpisodeRunner
from rsd_ray.env.libero_env import configure_renderer


class EnvWorker:
    def __init__(self, env_config: EnvConfig, policy_actor_name: str, *, needs_privileged_state: bool,
                 record_chunks: bool, record_samples: bool = False, use_cameras: bool = True):
        configure_renderer(env_config.mujoco_gl)
        # By name, not by handle: a restarted actor must not depend on a constructor argument
        # that lives in the object store (ray-project/ray#53727).
        self.policy_actor = ray.get_actor(policy_actor_name)
        self.runner = EpisodeRunner(env_config, self._ask_policy, needs_privileged_state=needs_privileged_state,
                                    record_chunks=record_chunks, record_samples=record_samples,
                                    use_cameras=use_cameras)

    def _ask_policy(self, observation):
        return ray.get(self.policy_actor.act.remote(observation))

    def run_episode(self, request: EpisodeRequest) -> EpisodeResult:
        try:
            return self.runner.run(request)
        finally:
            self.policy_actor.end_episode.remote(request.episode_key)

    def pid(self) -> int:
        return os.getpid()

    def num_envs_built(self) -> int:
        return self.runner.num_envs_built

    def close(self) -> None:
        self.runner.close()


def make_env_actor(env_config: EnvConfig, policy_actor_name: str, *, needs_privileged_state: bool,
                   record_chunks: bool, max_restarts: int, record_samples: bool = False, use_cameras: bool = True,
                   name: str | None = None) -> Any:
    # max_task_retries=0: a call lost with a dead actor is re-queued by the driver, which counts
    # attempts; a silent Ray-side retry would hide the attempt from the records.
    cls = ray.remote(num_cpus=1, max_restarts=max_restarts, max_task_retries=0)(EnvWorker)
    if name:
        cls = cls.options(name=name)
    return cls.remote(env_config, policy_actor_name, needs_privileged_state=needs_privileged_state,
                      record_chunks=record_chunks, record_samples=record_samples, use_cameras=use_cameras)
