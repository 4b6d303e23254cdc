"""Policies with no model: the no-op baseline, a seeded random policy for tests and
benchmarks, and a fault injector that misbehaves on purpose (NaN, wrong shape, exception) so
tests can prove a bad policy yields an `error` record."""
from __future__ import annotations

import time

import numpy as np

from rsd_ray.policy.base import ChunkStats, Observation, Policy, PolicyOutput
from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS, NOOP_ACTION


def _stats(batch_size: int, t0: float) -> list[ChunkStats]:
    ms = (time.perf_counter() - t0) * 1e3
    return [ChunkStats(policy_ms=ms, batch_size=batch_size) for _ in range(batch_size)]


class NoopPolicy(Policy):
    """Holds the arm still with the gripper open: every episode should time out."""

    name = "noop"

    def predict(self, observations: list[Observation]) -> PolicyOutput:
        t0 = time.perf_counter()
        chunks = np.tile(np.asarray(NOOP_ACTION, np.float32), (len(observations), CHUNK_STEPS, 1))
        return PolicyOutput(chunks=chunks, stats=_stats(len(observations), t0))


class RandomPolicy(Policy):
    """Small random arm motions, reproducible from (episode seed, chunk index) alone, so an
    episode's actions do not depend on how requests were batched."""

    name = "random"

    def __init__(self, scale: float = 0.3):
        self.scale = scale

    def predict(self, observations: list[Observation]) -> PolicyOutput:
        t0 = time.perf_counter()
        chunks = np.empty((len(observations), CHUNK_STEPS, ACTION_DIM), np.float32)
        for b, obs in enumerate(observations):
            rng = np.random.default_rng([obs.seed, obs.chunk_index])
            chunks[b, :, :6] = rng.uniform(-self.scale, self.scale, (CHUNK_STEPS, 6))
            chunks[b, :, 6] = rng.choice([-1.0, 1.0])
        return PolicyOutput(chunks=chunks, stats=_stats(len(observations), t0))


class FaultPolicy(Policy):
    """Behaves like NoopPolicy until chunk `at_chunk`, then: 'nan' returns NaN actions,
    'wrong_shape' returns [T, A-1] chunks, 'raise' raises inside predict."""

    name = "fault"
    FAULTS = ("nan", "wrong_shape", "raise")

    def __init__(self, fault: str, at_chunk: int = 0):
        if fault not in self.FAULTS:
            raise ValueError(f"policy.fault={fault!r}; expected one of {', '.join(self.FAULTS)}")
        self.fault, self.at_chunk = fault, at_chunk

    def predict(self, observations: list[Observation]) -> PolicyOutput:
        out = NoopPolicy().predict(observations)
        if any(o.chunk_index >= self.at_chunk for o in observations):
            if self.fault == "raise":
                raise RuntimeError("FaultPolicy: injected failure inside predict()")
            if self.fault == "nan":
                out.chunks[:, 3, 0] = np.nan
            else:
                out.chunks = out.chunks[:, :, :-1]
        return out
