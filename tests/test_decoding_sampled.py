"""Sampled speculative decoding with `exact` acceptance has the main model's distribution.

One fixed observation decoded N times with different seeds, autoregressively and
speculatively; chi-square homogeneity tests compare token distributions (layer marginals and
a layer-0 x layer-1 joint). The model uses T=1, D=2 (two tokens per RFSQ layer), so whole
layers are accepted often enough for the verification pass to be exercised; the engine code
is the same for any T and D. A deliberately wrong rule (resample from p instead of
norm(max(0, p - q)), the classic mistake) must fail the same test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from rsd_ray.decoding import acceptance
from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.modeling_rsd import RSDModel

N = 3000
V = 7


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    torch.manual_seed(3)
    cfg = RSDConfig.tiny(dtype="float64", patch_size=112, max_instruction_tokens=4, chunk_steps=1, latent_dim=2)
    model = RSDModel(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(1, cfg.prefix_length, cfg.hidden_size, generator=g, dtype=torch.float64)
    embeds, mask = prefix.expand(N, -1, -1), torch.ones(N, cfg.prefix_length, dtype=torch.bool)
    ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", sample=True, num_slots=1000)).run(
        embeds, mask, seeds=torch.arange(N) + 10**6)
    return model, SelfDraft(model, prefix), embeds, mask, ar.tokens


class SelfDraft:
    """A draft built from the main model itself, distorted: q_k = softmax(0.7 * logits_k + noise),
    where logits_k is the main model's layer-k output given the draft's own layers < k (run
    without a cache on the shared prefix). Close to p but not equal, so whole layers are
    accepted often and the residual rule matters. Any q is valid for the lossless rule."""

    def __init__(self, model: RSDModel, prefix: torch.Tensor):
        self.model, self.prefix = model, prefix          # prefix [1, P, H]
        g = torch.Generator().manual_seed(5)
        self.noise = 0.8 * torch.randn(8, model.config.chunk_steps, model.config.latent_dim, V, generator=g,
                                       dtype=torch.float64)

    def propose(self, hidden, num_layers, row_ids=None, uniforms=None):
        from rsd_ray.decoding.row_cache import prefill_mask
        m, c = self.model, self.model.config
        b, T = hidden.shape[0], c.chunk_steps
        P = self.prefix.shape[1]
        seq = torch.cat([self.prefix.expand(b, -1, -1), m.start_inputs(b)], dim=1)
        tokens, probs = [], []
        for k in range(num_layers):
            n = seq.shape[1]
            pos = torch.arange(n)[None].expand(b, -1)
            h = m.run_backbone(seq, pos, prefill_mask(torch.ones(b, n, dtype=torch.bool), seq.dtype))
            logits = m.logits(h[:, P + k * T:])                                   # [b, T, D, V]
            q = torch.softmax(0.7 * logits + self.noise[k], -1)
            tok = acceptance.sample_tokens(q, uniforms[..., k])
            tokens.append(tok)
            probs.append(q)
            seq = torch.cat([seq, m.block_inputs(tok[..., None], torch.full((b, 1), k + 1))], dim=1)
        return torch.stack(tokens, 3), torch.stack(probs, 3)


def p_values(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """a, b: [N, T=1, D=2, L] samples. Chi-square homogeneity p-values for a few statistics."""
    stats = {}

    def test(name: str, xa: torch.Tensor, xb: torch.Tensor, cells: int) -> None:
        table = np.stack([np.bincount(xa.numpy(), minlength=cells), np.bincount(xb.numpy(), minlength=cells)])
        table = table[:, table.sum(0) >= 5]          # drop (near-)empty cells
        stats[name] = float(chi2_contingency(table)[1])

    for layer in range(4):
        for d in range(2):
            test(f"layer{layer}_d{d}", a[:, 0, d, layer], b[:, 0, d, layer], V)
    test("joint_l0d0_l1d0", a[:, 0, 0, 0] * V + a[:, 0, 0, 1], b[:, 0, 0, 0] * V + b[:, 0, 0, 1], V * V)
    test("joint_l1d0_l2d1", a[:, 0, 0, 1] * V + a[:, 0, 1, 2], b[:, 0, 0, 1] * V + b[:, 0, 1, 2], V * V)
    return stats


def speculative(model, draft, embeds, mask, K: int):
    engine = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=K, sample=True,
                                                       num_slots=1000))
    return engine.run(embeds, mask, seeds=torch.arange(N))


@pytest.mark.parametrize("K", [3, 7])
def test_sampled_speculative_matches_autoregressive_distribution(setup, K):
    model, draft, embeds, mask, ar_tokens = setup
    sp = speculative(model, draft, embeds, mask, K)
    accepted = sp.counters["num_accepted_layers"]
    # the verification pass must really judge layers, or this test would only check layer 0
    assert (accepted >= 2).float().mean() > 0.05, f"too few rows reach verification: {accepted.mean()}"
    assert (accepted == 0).float().mean() > 0.05
    pv = p_values(ar_tokens, sp.tokens)
    # 10 tests, seeded: a family-wise 1e-3 level
    assert min(pv.values()) > 1e-4, pv


def test_wrong_residual_rule_fails_the_same_test(setup, monkeypatch):
    model, draft, embeds, mask, ar_tokens = setup
    monkeypatch.setattr(acceptance, "residual_distribution", lambda p, q: p)
    sp = speculative(model, draft, embeds, mask, 3)
    pv = p_values(ar_tokens, sp.tokens)
    assert min(pv.values()) < 1e-6, pv


def test_sampling_is_reproducible_per_seed_whatever_the_batch(setup):
    model, draft, embeds, mask, _ = setup
    seeds = torch.arange(40) * 7
    a = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=3, sample=True,
                                                  num_slots=40)).run(embeds[:40], mask[:40], seeds)
    b = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=3, sample=True,
                                                  num_slots=3)).run(embeds[:40], mask[:40], seeds)
    assert torch.equal(a.tokens, b.tokens)
    c = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=3, sample=True,
                                                  num_slots=40)).run(embeds[:40], mask[:40], seeds + 1)
    assert not torch.equal(a.tokens, c.tokens)


def test_acceptance_rule_unit_cases():
    # p = q: sampled exact keeps every draft token
    p = torch.softmax(torch.randn(4, 3, 2, 5, V, dtype=torch.float64), -1)
    draft = p.argmax(-1)
    u = torch.rand(4, 3, 2, 5, dtype=torch.float64)
    verdict = acceptance.judge(acceptance.parse_acceptance("exact"), draft, p, p, u, u)
    assert verdict.layer_accepted.all() and (verdict.num_accepted == 5).all()
    # greedy exact: a wrong token in layer 2 of row 0 stops acceptance there, other rows untouched
    greedy = p.argmax(-1).clone()
    greedy[0, 1, 1, 2] = (greedy[0, 1, 1, 2] + 1) % V
    verdict = acceptance.judge(acceptance.parse_acceptance("exact"), greedy, None, p)
    assert verdict.num_accepted.tolist() == [2, 5, 5, 5]
    assert torch.equal(verdict.tokens, p.argmax(-1))
    # threshold edges
    rule0, rule1 = acceptance.parse_acceptance("threshold:0"), acceptance.parse_acceptance("threshold:1.0")
    assert (acceptance.judge(rule0, greedy, None, p).num_accepted == 5).all()
    assert (acceptance.judge(rule1, greedy, None, p).num_accepted == 0).all()
    assert not rule1.lossless and str(rule1) == "threshold:1"
