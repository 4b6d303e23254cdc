"""The contract between the env side and any policy (noop, scripted expert, RSD model).

An EnvActor sends one `Observation` per chunk boundary; the PolicyActor stacks the
observations of many envs and calls `Policy.predict` once; each observation gets back one
`[T, A]` action chunk in the env's action space plus the `ChunkStats` of its decoding. The
env side never imports model code and a policy never imports the simulator.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS


@dataclass
class Observation:
    """One env's observation at a chunk boundary (after the env side's image recipe)."""

    agentview: np.ndarray        # [H, W, 3] uint8, third-person camera, rotated 180 degrees
    wrist: np.ndarray            # [H, W, 3] uint8, eye-in-hand camera, rotated 180 degrees
    proprio: np.ndarray          # [8] float32: eef pos (3), eef axis-angle (3), gripper qpos (2)
    instruction: str
    episode_key: str             # 'suite/task_id/trial': lets stateful policies keep per-episode memory
    chunk_index: int             # 0 for the first chunk after the wait steps
    seed: int = 0                # per-episode seed for sampled decoding (reproducible per key)
    # Simulator state for privileged policies (the scripted expert); None unless the policy
    # declares `needs_privileged_state`. Keys are documented by the policy that reads them.
    privileged: dict[str, Any] | None = None


@dataclass
class ChunkStats:
    """Where one chunk's decoding time went, and how much speculation helped.

    Times are milliseconds measured inside the policy for the whole batch the chunk was part
    of (every row of one batch shares them); counts are per row. -1 means "not applicable"
    (e.g. accepted layers for a non-speculative mode).
    """

    policy_ms: float = 0.0       # whole predict() call
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    step_ms: float = 0.0         # prefill + autoregressive block steps
    decode_ms: float = 0.0       # tokens -> actions
    num_accepted_layers: int = -1
    num_main_passes: int = 0
    batch_size: int = 1
    # Whether the chunk is a demonstration label for its observation (a recorded training
    # sample); False for the learner's chunks of a takeover policy (takeover.py).
    is_demonstration: bool = True

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class PolicyOutput:
    chunks: np.ndarray                          # [B, T, A] float32, env action space
    stats: list[ChunkStats] = field(default_factory=list)   # one per row


class Policy(abc.ABC):
    """A batched action-chunk policy. Subclasses set the class attributes they need."""

    name: str = "policy"
    decoding_mode: str = "none"       # parallel / autoregressive / speculative / none
    acceptance: str = "none"          # exact / threshold:tau / none
    lossless: bool = True             # False for threshold acceptance
    needs_privileged_state: bool = False

    @abc.abstractmethod
    def predict(self, observations: list[Observation]) -> PolicyOutput:
        """observations: B of them -> chunks [B, T, A] and B ChunkStats."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this policy: processor, checkpoint hash, config."""
        return {"name": self.name, "decoding_mode": self.decoding_mode, "acceptance": self.acceptance,
                "lossless": self.lossless, "checkpoint_hash": "", "processor": "none"}

    def end_episode(self, episode_key: str) -> None:
        """Called when an episode ends, so stateful policies can drop its memory."""


def check_chunks(chunks: np.ndarray, batch_size: int) -> np.ndarray:
    """Raise a clear error unless chunks is a finite [B, T, A] array; return it as float32."""
    chunks = np.asarray(chunks)
    expected = (batch_size, CHUNK_STEPS, ACTION_DIM)
    if chunks.shape != expected:
        raise ValueError(f"policy returned chunks of shape {chunks.shape}; expected [B, T, A] = {expected}")
    if not np.all(np.isfinite(chunks)):
        bad = np.argwhere(~np.isfinite(chunks))[0].tolist()
        raise ValueError(f"policy returned a non-finite action (first at [b, t, a] = {bad}): "
                         f"{chunks[tuple(bad)]}")
    return chunks.astype(np.float32, copy=False)
