"""Takeover demonstrations (DAgger-style): a learned policy drives, the scripted expert takes over.

Behaviour cloning from the expert's own trajectories only ever shows the policy states the
expert visits. The policy's small errors (a grasp a centimetre off, a late close) lead it to
states with no label in the data, and most of the default policy's failures are such missed
grasps. Here the learner drives each episode for its first S chunks (S drawn per episode, so
takeovers spread over approach, grasp and carry), then the expert plans from wherever the
learner left the arm and finishes the task. Only the expert's chunks are demonstrations
(`ChunkStats.is_demonstration`), so the dataset gains the expert's corrections from states
the learner itself reaches; with `record_samples="success"` only episodes the expert then
finished count.

The expert starts a takeover from its `approach` phase, which opens the gripper (or closes
it, for an expanding grasp). That is the right label when the learner's fingers are open or
closed on nothing, and the wrong one while the learner holds the object: takeover waits
until the goal object is not raised above where the episode found it and the fingers are
either open or shut on air.

Privileged state is read only for the expert and for the takeover test, never by the learner.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from rsd_ray.env.privileged import goal_object
from rsd_ray.policy.base import ChunkStats, Observation, Policy, PolicyOutput, check_chunks
from rsd_ray.policy.expert import ScriptedExpert

OPEN_FINGER_WIDTH_M = 0.06     # finger joints +/-0.04 each when fully open
SHUT_FINGER_WIDTH_M = 0.01     # closed with nothing between the fingers
RAISED_M = 0.02                # goal object this far above its start height: the learner holds it


@dataclass
class _Takeover:
    switch_at: int                  # first chunk the expert may drive
    object_start_z: float | None    # goal object's bottom at chunk 0
    expert_driving: bool = False


def takeover_chunk(episode_key: str, seed: int, first: int, last: int) -> int:
    """S in [first, last], reproducible per (episode key, seed)."""
    rng = np.random.default_rng([zlib.crc32(episode_key.encode()), seed, 7919])
    return int(rng.integers(first, last + 1))


def expert_may_take_over(state: dict[str, Any], object_start_z: float | None) -> bool:
    """Whether the expert's restart from `approach` is a correct label in this state."""
    obj = goal_object(state)
    if object_start_z is not None and obj is not None and float(obj["aabb_min"][2]) - object_start_z > RAISED_M:
        return False
    qpos = np.asarray(state["gripper_qpos"], dtype=np.float64)
    width = float(qpos[0] - qpos[1])
    return width > OPEN_FINGER_WIDTH_M or (width < SHUT_FINGER_WIDTH_M and not state.get("gripper_contact", False))


class TakeoverPolicy(Policy):
    """`learner` drives chunks 0..S-1 of each episode, `expert` the rest (see module docstring)."""

    name = "takeover"
    needs_privileged_state = True

    def __init__(self, learner: Policy, expert: ScriptedExpert, first_chunk: int, last_chunk: int) -> None:
        if not 0 <= first_chunk <= last_chunk:
            raise ValueError(f"takeover chunks [{first_chunk}, {last_chunk}]; expected 0 <= first <= last")
        self.learner, self.expert = learner, expert
        self.first_chunk, self.last_chunk = first_chunk, last_chunk
        self.decoding_mode, self.acceptance, self.lossless = learner.decoding_mode, learner.acceptance, learner.lossless
        self._episodes: dict[str, _Takeover] = {}

    def _episode(self, obs: Observation) -> _Takeover:
        if obs.privileged is None:
            raise ValueError(f"TakeoverPolicy needs Observation.privileged for {obs.episode_key!r}; got None")
        if obs.chunk_index == 0 or obs.episode_key not in self._episodes:
            obj = goal_object(obs.privileged)
            self._episodes[obs.episode_key] = _Takeover(
                switch_at=takeover_chunk(obs.episode_key, obs.seed, self.first_chunk, self.last_chunk),
                object_start_z=float(obj["aabb_min"][2]) if obj is not None else None)
            # The expert keeps the orientation the episode started with, not the learner's.
            self.expert.begin_episode(obs.episode_key, obs.privileged["eef_mat"])
        return self._episodes[obs.episode_key]

    def driven_by_expert(self, obs: Observation) -> bool:
        ep = self._episode(obs)
        if not ep.expert_driving and obs.chunk_index >= ep.switch_at:
            ep.expert_driving = expert_may_take_over(obs.privileged, ep.object_start_z)
        return ep.expert_driving

    def predict(self, observations: list[Observation]) -> PolicyOutput:
        by_expert = [self.driven_by_expert(obs) for obs in observations]
        chunks: list[np.ndarray | None] = [None] * len(observations)
        stats: list[ChunkStats | None] = [None] * len(observations)
        for is_expert, policy in ((False, self.learner), (True, self.expert)):
            rows = [i for i, e in enumerate(by_expert) if e == is_expert]
            if not rows:
                continue
            out = policy.predict([observations[i] for i in rows])
            for j, i in enumerate(rows):
                chunks[i] = out.chunks[j]
                row_stats = out.stats[j] if out.stats else ChunkStats(batch_size=len(rows))
                row_stats.is_demonstration = is_expert
                stats[i] = row_stats
        return PolicyOutput(chunks=check_chunks(np.stack(chunks), len(observations)), stats=stats)

    def end_episode(self, episode_key: str) -> None:
        self._episodes.pop(episode_key, None)
        self.learner.end_episode(episode_key)
        self.expert.end_episode(episode_key)

    def describe(self) -> dict[str, Any]:
        out = self.learner.describe()
        out.update({"name": self.name, "learner": out.get("name"), "takeover_chunks": [self.first_chunk, self.last_chunk],
                    "expert": self.expert.describe()})
        return out
