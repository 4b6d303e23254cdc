"""Builds the configured Policy inside the policy actor. Models load from local paths only."""
from __future__ import annotations

import hashlib
from pathlib import Path

from rsd_ray.config import CHECKPOINT_POLICY_KINDS, DecodeConfig, PolicyConfig
from rsd_ray.policy.base import Policy


def build_policy(policy: PolicyConfig, decode: DecodeConfig, device: str = "cpu") -> Policy:
    if policy.kind == "noop":
        from rsd_ray.policy.simple import NoopPolicy
        return NoopPolicy()
    if policy.kind == "random":
        from rsd_ray.policy.simple import RandomPolicy
        return RandomPolicy()
    if policy.kind == "fault":
        from rsd_ray.policy.simple import FaultPolicy
        return FaultPolicy(policy.fault, policy.fault_at_chunk)
    if policy.kind == "expert":
        from rsd_ray.policy.expert import ScriptedExpert
        return ScriptedExpert()
    if policy.kind in CHECKPOINT_POLICY_KINDS:
        from rsd_ray.policy.rsd_policy import RSDPolicy
        graph_mode = policy.graph_mode
        if graph_mode == "auto":
            graph_mode = "cuda_graph" if str(device).startswith("cuda") else "eager"
        rsd = RSDPolicy.from_pretrained(policy.checkpoint, decode, device=device, num_slots=policy.max_batch,
                                        graph_mode=graph_mode)
        if policy.kind == "rsd":
            return rsd
        from rsd_ray.policy.expert import ScriptedExpert
        from rsd_ray.policy.takeover import TakeoverPolicy
        return TakeoverPolicy(rsd, ScriptedExpert(), *policy.takeover_chunks)
    raise ValueError(f"policy.kind={policy.kind!r} has no builder")


def needs_privileged_state(policy: PolicyConfig) -> bool:
    return policy.kind in ("expert", "takeover")


def checkpoint_hash(path: str | None) -> str:
    """Content hash of a checkpoint directory (names + bytes of every file), computed without
    loading any model, so the driver can key the manifest on it."""
    if not path:
        return ""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def needs_images(policy: PolicyConfig) -> bool:
    """A privileged expert reads the simulator, not pixels: its envs may skip the cameras
    entirely (outcomes are unchanged, physics does not depend on rendering)."""
    return policy.kind != "expert"


def use_cameras(cameras: str, policy: PolicyConfig, recording_samples: bool) -> bool:
    if cameras != "auto":
        return cameras == "on"
    return needs_images(policy) or recording_samples
