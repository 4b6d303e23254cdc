"""Acceptance rules for speculative decoding of RFSQ layers.

Terms (used the same way in modes.py and the records):
- *draft layer*: the draft model's proposal for one RFSQ layer, T*D tokens.
- *kept token*: a draft token the rule lets through; a *replacement* is the main model's token
  in its place.
- *accepted layer*: every one of its tokens kept. Speculation keeps the longest run of
  accepted layers from the first judged one (`num_accepted`); the first rejected layer becomes
  the per-token mix of kept draft tokens and replacements; later layers are discarded.

Rules:
- `exact`, greedy: a token is kept iff it equals the main model's argmax; replacement = argmax.
  Output is token-for-token the main model's greedy output.
- `exact`, sampled: keep draft token x with probability min(1, p(x)/q(x)), else replace it with
  a sample from norm(max(0, p - q)). Tokens of a layer are independent given earlier layers,
  so the kept/replaced mix is distributed exactly as p (lossless).
- `threshold:tau` (lossy): keep x iff p(x) >= tau; replacement = argmax p (greedy) or a sample
  from p. tau=0 keeps everything, tau=1 keeps only tokens p is certain of.

All tensors are dense with a fixed number K of judged layers (no ragged layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class AcceptanceRule:
    kind: Literal["exact", "threshold"] = "exact"
    tau: float = 0.0                 # only for kind == "threshold"

    @property
    def lossless(self) -> bool:
        return self.kind == "exact"

    def __str__(self) -> str:
        return "exact" if self.kind == "exact" else f"threshold:{self.tau:g}"


def parse_acceptance(text: str) -> AcceptanceRule:
    """'exact' or 'threshold:tau' with tau in [0, 1]."""
    if text == "exact":
        return AcceptanceRule("exact")
    if text.startswith("threshold:"):
        raw = text.split(":", 1)[1]
        try:
            tau = float(raw)
        except ValueError:
            raise ValueError(f"acceptance={text!r}: {raw!r} is not a number; expected 'threshold:0.7'") from None
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"acceptance={text!r}: tau={tau} is outside [0, 1]")
        return AcceptanceRule("threshold", tau)
    raise ValueError(f"acceptance={text!r}; expected 'exact' or 'threshold:tau' (e.g. 'threshold:0.7')")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in at least float32 (float64 stays float64)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.to(dtype).softmax(-1)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. probs [..., V] (need not be normalised), uniforms [...] in [0, 1).
    Returns tokens [...] int64 in [0, V)."""
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype) * cdf[..., -1]
    tokens = (cdf <= target[..., None]).sum(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


def choose_tokens(probs: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """The main model's own choice: argmax (uniforms None) or a sample. probs [..., V] -> [...]."""
    return probs.argmax(-1) if uniforms is None else sample_tokens(probs, uniforms)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis; falls back to p where p == q everywhere (then the
    draft token is always kept and the residual is never drawn)."""
    r = (p - q.to(p.dtype)).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(p.dtype).tiny), p)


@dataclass
class Verdict:
    tokens: torch.Tensor         # [B, T, D, K] kept draft token or replacement, per judged layer
    layer_accepted: torch.Tensor  # [B, K] bool: all T*D tokens of the layer kept
    num_accepted: torch.Tensor   # [B] long in [0, K]: leading accepted layers


def judge(rule: AcceptanceRule, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
          main_probs: torch.Tensor, accept_uniforms: torch.Tensor | None = None,
          resample_uniforms: torch.Tensor | None = None) -> Verdict:
    """Judge K draft layers against the main model.

    draft_tokens [B, T, D, K] int64; draft_probs [B, T, D, K, V] (q; needed for sampled exact);
    main_probs [B, T, D, K, V] (p for each layer, given the draft's earlier layers);
    accept_uniforms, resample_uniforms [B, T, D, K] in [0, 1): sampled decoding; None = greedy.
    """
    if draft_tokens.shape != main_probs.shape[:-1]:
        raise ValueError(f"draft_tokens {tuple(draft_tokens.shape)} and main_probs {tuple(main_probs.shape)} "
                         "disagree; expected [B, T, D, K] and [B, T, D, K, V]")
    sampled = accept_uniforms is not None
    p_draft = main_probs.gather(-1, draft_tokens[..., None])[..., 0]            # [B, T, D, K]
    if rule.kind == "threshold":
        kept = p_draft >= rule.tau
        replacement = choose_tokens(main_probs, resample_uniforms)
    elif not sampled:
        replacement = main_probs.argmax(-1)
        kept = draft_tokens == replacement
    else:
        if draft_probs is None:
            raise ValueError("sampled exact acceptance needs the draft's probabilities q")
        q_draft = draft_probs.gather(-1, draft_tokens[..., None])[..., 0].to(p_draft.dtype)
        kept = accept_uniforms.to(p_draft.dtype) * q_draft < p_draft              # u < p/q without dividing
        replacement = sample_tokens(residual_distribution(main_probs, draft_probs), resample_uniforms)
    tokens = torch.where(kept, draft_tokens, replacement)
    layer_accepted = kept.flatten(1, 2).all(dim=1)                              # [B, K]
    num_accepted = layer_accepted.long().cumprod(dim=1).sum(dim=1)
    return Verdict(tokens, layer_accepted, num_accepted)
