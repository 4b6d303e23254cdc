"""Smooth synthetic LIBERO-like action trajectories, for training and testing the RFSQ tokenizer
until real demonstrations are in the project.

LIBERO's action space: xyz delta (3) and axis-angle delta (3), each scaled to about [-1, 1]
(demonstrations saturate at +-0.9375), and the gripper at -1 (open) / +1 (close). An episode
here is a sum of a few low-frequency sinusoids per arm dim (translation larger than rotation),
a little teleoperation-like noise, clipped to [-1, 1], and a gripper that closes (and maybe
reopens) at random events. Episodes are cut into non-overlapping T-step chunks.
"""
from __future__ import annotations

import numpy as np

from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS

_TRANSLATION_AMPLITUDE = (0.2, 0.8)   # per-episode peak magnitude range, xyz dims
_ROTATION_AMPLITUDE = (0.05, 0.35)    # axis-angle dims
_PERIOD_STEPS = (24.0, 160.0)         # sinusoid periods: smooth over a chunk, varied over an episode
_EPISODE_CHUNKS = (12, 40)            # episode length in chunks (96..320 steps at T=8)


def synthetic_episode(rng: np.random.Generator, num_steps: int, noise_std: float = 0.01) -> np.ndarray:
    """One episode of num_steps actions -> [S, A] float32 (A = 7)."""
    steps = np.arange(num_steps, dtype=np.float64)
    arm = np.zeros((num_steps, 6))
    for dim in range(6):
        low, high = _TRANSLATION_AMPLITUDE if dim < 3 else _ROTATION_AMPLITUDE
        num_waves = int(rng.integers(1, 4))
        periods = rng.uniform(*_PERIOD_STEPS, size=num_waves)
        phases = rng.uniform(0, 2 * np.pi, size=num_waves)
        weights = rng.dirichlet(np.ones(num_waves))
        wave = (weights * np.sin(2 * np.pi * steps[:, None] / periods + phases)).sum(axis=1)
        arm[:, dim] = rng.uniform(low, high) * wave / max(np.abs(wave).max(), 1e-6) + rng.uniform(-0.1, 0.1)
    arm += rng.normal(0.0, noise_std, size=arm.shape)
    arm = np.clip(arm, -1.0, 1.0)

    # Gripper: open (-1), then alternating close/open events at random steps.
    gripper = -np.ones(num_steps)
    num_events = int(rng.integers(1, 4))
    for event_step in np.sort(rng.integers(1, num_steps, size=num_events)):
        gripper[event_step:] *= -1.0
    return np.concatenate([arm, gripper[:, None]], axis=1).astype(np.float32)


def synthetic_chunks(num_chunks: int, seed: int = 0, chunk_steps: int = CHUNK_STEPS,
                     noise_std: float = 0.01) -> np.ndarray:
    """num_chunks chunks from seeded synthetic episodes -> [N, T, A] float32.

    The same (num_chunks, seed) always gives the same array; different seeds give independent
    episodes, which is how held-out sets are made.
    """
    if num_chunks < 1:
        raise ValueError(f"synthetic_chunks: num_chunks={num_chunks}; expected >= 1")
    rng = np.random.default_rng(seed)
    parts = []
    total = 0
    while total < num_chunks:
        num_episode_chunks = int(rng.integers(*_EPISODE_CHUNKS))
        episode = synthetic_episode(rng, num_episode_chunks * chunk_steps, noise_std)
        parts.append(episode.reshape(num_episode_chunks, chunk_steps, ACTION_DIM))
        total += num_episode_chunks
    return np.concatenate(parts)[:num_chunks]
