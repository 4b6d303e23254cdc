"""PolicyActor: gathers concurrent chunk requests from many EnvActors into one batch.

Ray core has no request batching outside Ray Serve (whose `@serve.batch` would bring an HTTP
proxy and a controller along), so this async actor does it in a few lines: requests queue up,
a loop takes up to `max_batch` of them (waiting at most `max_wait_ms` for stragglers once the
first has arrived), and runs `Policy.predict` in a worker thread, so the event loop keeps
gathering the next batch while the model runs.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rsd_ray.config import CHECKPOINT_POLICY_KINDS, DecodeConfig, PolicyConfig
from rsd_ray.policy.base import ChunkStats, Observation
from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS
from rsd_ray.policy.registry import build_policy


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class PolicyServer:
    def __init__(self, policy_config: PolicyConfig, decode_config: DecodeConfig):
        self.config = policy_config
        device = resolve_device(policy_config.device) if policy_config.kind in CHECKPOINT_POLICY_KINDS else "cpu"
        self.policy = build_policy(policy_config, decode_config, device=device)
        self._queue: asyncio.Queue | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self.num_batches = 0
        self.batch_sizes: list[int] = []

    def describe(self) -> dict[str, Any]:
        return self.policy.describe()

    def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {"num_batches": self.num_batches, "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0,
                "max_batch_size": max(sizes) if sizes else 0}

    def end_episode(self, episode_key: str) -> None:
        self.policy.end_episode(episode_key)

    async def act(self, observation: Observation) -> tuple[np.ndarray, ChunkStats]:
        """One observation -> its [T, A] chunk and the stats of the batch it rode in."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((observation, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.config.max_wait_ms / 1e3
            while len(batch) < self.config.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0.0)))
                except asyncio.TimeoutError:
                    break
            observations = [obs for obs, _ in batch]
            try:
                chunks, stats = await loop.run_in_executor(self._executor, self._predict, observations)
            except Exception as exc:  # noqa: BLE001 - every waiting env gets the policy's error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.num_batches += 1
            self.batch_sizes.append(len(batch))
            for (_, future), chunk, stat in zip(batch, chunks, stats):
                if not future.done():
                    future.set_result((chunk, stat))

    def _predict(self, observations: list[Observation]) -> tuple[np.ndarray, list[ChunkStats]]:
        t0 = time.perf_counter()
        out = self.policy.predict(observations)
        chunks = np.asarray(out.chunks)
        # Shape is checked for the whole batch (a wrong shape is wrong for every row); NaNs are
        # checked per row on the env side, so one bad row does not fail its batch-mates' episodes.
        if chunks.shape != (len(observations), CHUNK_STEPS, ACTION_DIM):
            raise ValueError(f"policy {self.policy.name!r} returned chunks of shape {chunks.shape}; "
                             f"expected [B, T, A] = ({len(observations)}, {CHUNK_STEPS}, {ACTION_DIM})")
        stats = out.stats or [ChunkStats() for _ in observations]
        wall_ms = (time.perf_counter() - t0) * 1e3
        for s in stats:
            s.batch_size = len(observations)
            if s.policy_ms <= 0:
                s.policy_ms = wall_ms
        return chunks, stats
