"""S decoding slots with static shapes: which observation each slot holds and how far it got.

A slot holds one chunk being decoded. Its progress is `num_done` (RFSQ layers already final,
0..L) and `phase`:
    EMPTY  - free, takes the next waiting observation (continuous refill);
    VERIFY - speculative row whose layer 0 was accepted: its next pass scores draft layers;
    STEP   - its next pass computes one block (one RFSQ layer);
    DONE   - all L layers final; collected, then EMPTY.
Every tensor is allocated once at [S, ...]; a pass reads and writes them in place, so rows
advance independently without reshaping anything.

Sampled decoding draws its uniforms from one generator per slot, seeded from the observation's
seed when the slot is filled: a chunk's random numbers do not depend on which other chunks
shared its batch, so sampled runs are reproducible per observation.
"""
from __future__ import annotations

import torch

EMPTY, VERIFY, STEP, DONE = 0, 1, 2, 3

COUNTERS = ("draft_ms", "verify_ms", "step_ms", "num_main_passes", "num_accepted_layers")


class SlotTable:
    def __init__(self, num_slots: int, chunk_steps: int, latent_dim: int, num_rfsq_layers: int,
                 num_draft_layers: int, num_levels: int, max_len: int, device: torch.device | str):
        S, T, D, L, K, V = num_slots, chunk_steps, latent_dim, num_rfsq_layers, num_draft_layers, num_levels
        self.num_slots = S
        self.device = device
        self.row = torch.full((S,), -1, dtype=torch.long, device=device)      # [S] observation index, -1 empty
        self.phase = torch.zeros(S, dtype=torch.long, device=device)           # [S] EMPTY/VERIFY/STEP/DONE
        self.num_done = torch.zeros(S, dtype=torch.long, device=device)        # [S] final RFSQ layers
        self.tokens = torch.zeros(S, T, D, L, dtype=torch.long, device=device)  # [S, T, D, L]
        self.draft_tokens = torch.zeros(S, T, D, K, dtype=torch.long, device=device)  # [S, T, D, K]
        self.draft_probs = torch.zeros(S, T, D, K, V, dtype=torch.float64, device=device)  # [S, T, D, K, V]
        self.key_mask = torch.ones(S, max_len, dtype=torch.bool, device=device)  # [S, Lalloc] False: padding
        self.counters = {name: torch.zeros(S, dtype=torch.float64) for name in COUNTERS}   # CPU, [S]
        self.generators: list[torch.Generator | None] = [None] * S

    def free_slots(self) -> torch.Tensor:
        """[f] long: slots that can take an observation."""
        return torch.nonzero(self.phase == EMPTY).flatten()

    def fill(self, slots: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor | None) -> None:
        """slots, rows: [b] long. Resets the slots' progress, counters and generators."""
        self.row[slots] = rows.to(self.row.device)
        self.num_done[slots] = 0
        self.tokens[slots] = 0
        for name in COUNTERS:
            self.counters[name][slots.cpu()] = 0.0
        self.counters["num_accepted_layers"][slots.cpu()] = -1.0
        if seeds is not None:
            for s, seed in zip(slots.tolist(), seeds.tolist()):
                self.generators[s] = torch.Generator().manual_seed(int(seed))

    def release(self, slots: torch.Tensor) -> None:
        self.row[slots] = -1
        self.phase[slots] = EMPTY

    def add(self, name: str, slots: torch.Tensor, amount: float) -> None:
        self.counters[name][slots.cpu()] += amount

    def uniforms(self, slots: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[b, *shape] uniforms in [0, 1), each row from its own slot's generator."""
        draws = [torch.rand(shape, generator=self.generators[s], dtype=torch.float64) for s in slots.tolist()]
        if not draws:
            return torch.zeros((0, *shape), dtype=dtype, device=self.device)
        return torch.stack(draws).to(device=self.device, dtype=dtype)
