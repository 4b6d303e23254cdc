"""The draft model: proposes RFSQ layers 0..K-1 from the backbone's block-0 hidden states.

The main model's block 0 already sees the whole prefix, so its hidden states [B, T, H] are a
cheap summary of the observation. The draft projects them to a small width (H -> 512 for the
7B shape) and runs a tiny per-timestep recurrence over layers: the state for layer k sees the
tokens it proposed for layer k-1, so its proposals are coherent across layers. Tokens of one
layer are independent given that state, as the lossless acceptance rule requires.

`OracleDraft` (benchmarks and tests) runs the real draft for its cost, then replaces each
proposed layer by the main model's known answer with probability `copy_prob`, which gives
speculation a controlled acceptance rate.
"""
from __future__ import annotations

import torch
from torch import nn

from rsd_ray.decoding.acceptance import probabilities, sample_tokens
from rsd_ray.policy.configuration_rsd import RSDConfig


class DraftModel(nn.Module):
    def __init__(self, config: RSDConfig):
        super().__init__()
        c = self.config = config
        E, D, V = c.draft_hidden, c.latent_dim, c.num_levels
        self.in_proj = nn.Linear(c.hidden_size, E)
        self.layer_embed = nn.Parameter(torch.randn(c.draft_max_layers, E) * c.initializer_range)
        self.token_embed = nn.Parameter(torch.randn(D * V, E) * c.initializer_range)
        self.norm = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
        self.head = nn.Linear(E, D * V)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=c.initializer_range)
        self.register_buffer("level_offsets", torch.arange(D) * V, persistent=False)

    def propose(self, hidden: torch.Tensor, num_layers: int, row_ids: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] block-0 hidden states; num_layers K; uniforms [B, T, D, K] in [0, 1)
        to sample (None = greedy). row_ids [B] is unused here (see OracleDraft).
        Returns tokens [B, T, D, K] int64 in [0, V) and probs [B, T, D, K, V] (the draft's q)."""
        c = self.config
        if not 1 <= num_layers <= c.draft_max_layers:
            raise ValueError(f"draft asked for {num_layers} layers; this draft proposes 1..{c.draft_max_layers}")
        state = self.in_proj(hidden)                                   # [B, T, E]
        tokens, probs = [], []
        for k in range(num_layers):
            x = state + self.layer_embed[k]
            x = x + self.mlp(self.norm(x))
            q = probabilities(self.head(x).unflatten(-1, (c.latent_dim, c.num_levels)))   # [B, T, D, V]
            tok = q.argmax(-1) if uniforms is None else sample_tokens(q, uniforms[..., k])
            tokens.append(tok)
            probs.append(q)
            state = x + self.token_embed[tok + self.level_offsets].sum(dim=2)   # [B, T, E]
        return torch.stack(tokens, dim=3), torch.stack(probs, dim=3)


class OracleDraft(nn.Module):
    """A draft with a controlled acceptance rate, for benchmarks and tests.

    answers [N, T, D, L]: the main model's greedy tokens for every observation the engine will
    see (row id = index). Each proposed layer is the answer with probability copy_prob,
    otherwise the answer with one token shifted (so `exact` rejects it). Greedy decoding only.
    """

    def __init__(self, inner: DraftModel, answers: torch.Tensor, copy_prob: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= copy_prob <= 1.0:
            raise ValueError(f"copy_prob={copy_prob}; expected a probability in [0, 1]")
        self.inner, self.answers, self.copy_prob = inner, answers, copy_prob
        self.generator = torch.Generator().manual_seed(seed)

    def propose(self, hidden: torch.Tensor, num_layers: int, row_ids: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if row_ids is None:
            raise ValueError("OracleDraft needs row_ids to look up the answers")
        _, probs = self.inner.propose(hidden, num_layers)             # the real draft's cost
        truth = self.answers[row_ids.cpu()][..., :num_layers].clone()   # [B, T, D, K]
        B = truth.shape[0]
        copy = torch.rand(B, num_layers, generator=self.generator) < self.copy_prob   # [B, K]
        wrong = truth.clone()
        wrong[:, 0, 0, :] = (wrong[:, 0, 0, :] + 1) % self.inner.config.num_levels
        tokens = torch.where(copy[:, None, None, :], truth, wrong).to(hidden.device)
        return tokens, probs
