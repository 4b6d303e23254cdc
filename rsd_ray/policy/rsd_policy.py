"""RSDPolicy: observations -> RFSQ tokens by the decoding engine -> action chunks.

Processor (recorded by `describe()`): images uint8 [H, W, 3] -> float in [-1, 1], resized to
the config's image size if needed (the env side already delivers 224x224; the agentview is first
cropped to the config's `agentview_crop` when it has one); instruction ->
UTF-8 bytes padded to a fixed length with a mask; proprio [8] -> q01/q99 normalised and
clipped; actions = RFSQ decode (raw env units, the tokenizer un-normalises), gripper passed
through as decoded.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
from rsd_ray.policy.base import ChunkStats, Observation, Policy, PolicyOutput, check_chunks
from rsd_ray.policy.checkpoint import LoadedPolicy, ProprioStats, load_policy
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel
from rsd_ray.policy.modeling_rsd import RSDModel, preprocess_images, tokenize_instructions
from rsd_ray.policy.motion_feedback import motion_feedback

PROCESSOR = ("rsd_ray.rsd/1: images uint8->[-1,1] (agentview cropped to agentview_crop when set, "
             "bilinear-antialias resize to image_size if needed); "
             "instruction utf-8 bytes padded+masked; proprio bounds_q99 clipped; actions RFSQ decode (raw units)")


class RSDPolicy(Policy):
    name = "rsd"

    def __init__(self, model: RSDModel, draft: DraftModel | None, tokenizer, proprio: ProprioStats,
                 settings: DecodeSettings | None = None, checkpoint_hash: str = "",
                 drafter: Any = None):
        self.model, self.draft, self.tokenizer, self.proprio = model, draft, tokenizer, proprio
        self.settings = settings or DecodeSettings()
        self.engine = DecodeEngine(model, drafter if drafter is not None else draft, self.settings)
        self.decoding_mode = self.settings.mode
        self.acceptance = self.settings.acceptance if self.settings.mode == "speculative" else "none"
        self.lossless = self.engine.rule.lossless or self.settings.mode != "speculative"
        self.checkpoint_hash = checkpoint_hash
        # episode_key -> (chunk_index, eef position, chunk) of the episode's last chunk: the memory
        # motion feedback needs (config.motion_feedback_dim > 0); dropped by end_episode.
        self._last_chunk: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, decode_config: Any = None, device: str = "cpu",
                        num_slots: int | None = None, dtype: str | None = None,
                        allow_random_weights: bool = False, graph_mode: str | None = None) -> "RSDPolicy":
        """decode_config: rsd_ray.config.DecodeConfig or DecodeSettings (None: defaults).
        graph_mode: eager | static | cuda_graph (graphs.py), overriding decode_config's; None
        keeps decode_config's (eager when it has none)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded: LoadedPolicy = load_policy(path, device=device, dtype=dtype, allow_random_weights=allow_random_weights)
        settings = DecodeSettings.from_config(decode_config, num_slots=num_slots)
        if graph_mode is not None:
            settings = dataclasses.replace(settings, graph_mode=graph_mode)
        from rsd_ray.policy.registry import checkpoint_hash
        return cls(loaded.model, loaded.draft, loaded.tokenizer, loaded.proprio, settings,
                   checkpoint_hash(str(path)) if not loaded.random_weights else "random")

    @property
    def config(self) -> RSDConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def preprocess(self, observations: list[Observation]) -> tuple[torch.Tensor, ...]:
        """-> images [B, C, 3, S, S], instruction ids/mask [B, N], state [B, state_dim] (normalised
        proprio, then the motion feedback from this policy's memory of each episode's last chunk)."""
        c = self.config
        frames = []
        for i, obs in enumerate(observations):
            for name in ("agentview", "wrist"):
                img = np.asarray(getattr(obs, name))
                if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    raise ValueError(f"observation {i} ({obs.episode_key}): {name} has shape {img.shape} dtype "
                                     f"{img.dtype}; expected [H, W, 3] uint8")
                # torch.from_numpy shares memory, and refuses (with a warning) to share a read-only
                # array, such as a frame the episode sheet keeps: copy only those.
                writable = img.flags.writeable and img.flags.c_contiguous
                frames.append(torch.from_numpy(img if writable else np.array(img)))
        images = preprocess_images(frames, c.image_size, c.num_cameras, c.agentview_crop).unflatten(
            0, (len(observations), c.num_cameras))
        ids, mask = tokenize_instructions([o.instruction for o in observations], c.max_instruction_tokens)
        proprio = []
        for i, obs in enumerate(observations):
            p = np.asarray(obs.proprio, dtype=np.float32).reshape(-1)
            if p.shape != (c.proprio_dim,):
                raise ValueError(f"observation {i} ({obs.episode_key}): proprio has {p.shape[0]} values; "
                                 f"expected {c.proprio_dim}")
            proprio.append(torch.from_numpy(p))
        proprio_t = self.proprio.normalize(torch.stack(proprio))
        if c.motion_feedback_dim:
            proprio_t = torch.cat([proprio_t, torch.from_numpy(np.stack(
                [self._motion_feedback(obs) for obs in observations]))], dim=1)
        dev, dt = self.device, self.model.head.weight.dtype
        return images.to(dev, dt), ids.to(dev), mask.to(dev), proprio_t.to(dev, dt)

    @torch.inference_mode()
    def predict(self, observations: list[Observation]) -> PolicyOutput:
        start = time.perf_counter()
        B = len(observations)
        if B == 0:
            return PolicyOutput(np.zeros((0, self.config.chunk_steps, self.config.action_dim), np.float32), [])
        images, ids, mask, proprio = self.preprocess(observations)
        prefix, prefix_mask = self.model.encode_prefix(images, ids, mask, proprio)
        # a per-chunk seed: the episode's seed and the chunk index, so sampled runs reproduce per key
        seeds = torch.tensor([(o.seed * 1_000_003 + o.chunk_index) % (2 ** 62) for o in observations])
        result = self.engine.run(prefix, prefix_mask, seeds)
        t0 = time.perf_counter()
        chunks = self.tokenizer.decode(result.tokens.to(self.tokenizer.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        decode_ms = (time.perf_counter() - t0) * 1e3
        chunks_np = check_chunks(chunks.float().cpu().numpy(), B)
        if self.config.motion_feedback_dim:
            for obs, chunk in zip(observations, chunks_np):
                self._last_chunk[obs.episode_key] = (obs.chunk_index, np.asarray(obs.proprio)[:3].copy(), chunk)
        policy_ms = (time.perf_counter() - start) * 1e3
        stats = [ChunkStats(policy_ms=policy_ms, draft_ms=result.counter("draft_ms", i),
                            verify_ms=result.counter("verify_ms", i), step_ms=result.counter("step_ms", i),
                            decode_ms=decode_ms, num_accepted_layers=int(result.counter("num_accepted_layers", i)),
                            num_main_passes=int(result.counter("num_main_passes", i)), batch_size=B)
                 for i in range(B)]
        return PolicyOutput(chunks_np, stats)

    def _motion_feedback(self, obs: Observation) -> np.ndarray:
        """From this episode's previous chunk; zeros at its first chunk (and after a retry restarts
        it at chunk 0, so an earlier attempt's memory is never used)."""
        last = self._last_chunk.get(obs.episode_key)
        if last is None or last[0] != obs.chunk_index - 1:
            return motion_feedback(None, None, obs.proprio)
        return motion_feedback(last[2], last[1], np.asarray(obs.proprio))

    def end_episode(self, episode_key: str) -> None:
        self._last_chunk.pop(episode_key, None)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"checkpoint_hash": self.checkpoint_hash, "processor": PROCESSOR,
                    "draft_layers": self.settings.draft_layers if self.settings.mode == "speculative" else 0,
                    "sample": self.settings.sample, "num_slots": self.settings.num_slots,
                    "graph_mode": self.engine.graph_mode, "graph_buckets": list(self.settings.graph_buckets),
                    "model_config": self.config.to_dict()})
        return out
