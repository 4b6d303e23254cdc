"""Greedy speculative decoding with `exact` acceptance is token-for-token autoregressive decoding.

float64 + sdpa: verification (K*T-wide window) and block steps (T-wide) reduce in different
orders, so their logits differ in the last bits; in float64 that cannot flip an argmax on
random inputs, while eager attention's float32 softmax could (KV_CACHE.md pitfall 4).
"""
from __future__ import annotations

import pytest
import torch

from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel, OracleDraft
from rsd_ray.policy.modeling_rsd import RSDModel

NUM_OBS = 1000
NUM_SLOTS = 250           # < NUM_OBS: slots are refilled as chunks finish


def tiny_float64(**overrides) -> tuple[RSDModel, DraftModel]:
    torch.manual_seed(0)
    cfg = RSDConfig.tiny(dtype="float64", patch_size=56, max_instruction_tokens=8, **overrides)
    return RSDModel(cfg).double().eval(), DraftModel(cfg).double().eval()


def random_prefixes(cfg: RSDConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, P, H] embeddings and [n, P] masks with a random number of padded instruction tokens."""
    g = torch.Generator().manual_seed(seed)
    P, N_instr = cfg.prefix_length, cfg.max_instruction_tokens
    embeds = torch.randn(n, P, cfg.hidden_size, generator=g, dtype=torch.float64)
    mask = torch.ones(n, P, dtype=torch.bool)
    lengths = torch.randint(1, N_instr + 1, (n,), generator=g)
    mask[:, P - N_instr:] = torch.arange(N_instr)[None] < lengths[:, None]
    return embeds, mask


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, draft = tiny_float64()
    embeds, mask = random_prefixes(model.config, NUM_OBS, seed=1)
    ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=NUM_SLOTS)).run(embeds, mask)
    return model, draft, embeds, mask, ar


def test_autoregressive_counts_l_passes(setup):
    model, _, _, _, ar = setup
    assert ar.tokens.shape == (NUM_OBS, 8, 16, 8)
    assert (ar.counters["num_main_passes"] == model.config.num_rfsq_layers).all()
    assert (ar.counters["num_accepted_layers"] == -1).all()
    # a random model still has to produce varied tokens, or equality below would be vacuous
    assert len(torch.unique(ar.tokens)) == model.config.num_levels


@pytest.mark.parametrize("K", [1, 3, 7])
def test_speculative_exact_equals_autoregressive(setup, K):
    model, draft, embeds, mask, ar = setup
    L = model.config.num_rfsq_layers
    # each proposed layer is the right answer with probability 0.6, else one token is wrong:
    # rows of one batch accept different numbers of layers
    oracle = OracleDraft(draft, ar.tokens, copy_prob=0.6, seed=K)
    sp = DecodeEngine(model, oracle, DecodeSettings(mode="speculative", draft_layers=K,
                                                    num_slots=NUM_SLOTS)).run(embeds, mask)
    assert torch.equal(sp.tokens, ar.tokens)
    accepted = sp.counters["num_accepted_layers"].long()
    assert set(accepted.tolist()) == set(range(K + 1)), "every acceptance length 0..K should occur"
    passes = sp.counters["num_main_passes"].long()
    expected = 2 + L - torch.clamp(accepted + 1, min=2)
    assert torch.equal(passes, expected)
    if K == L - 1:
        assert passes.min() == 2        # full acceptance: prefill + one verification pass


def test_speculative_with_the_real_draft_equals_autoregressive(setup):
    model, draft, embeds, mask, ar = setup
    sp = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=3,
                                                   num_slots=NUM_SLOTS)).run(embeds[:200], mask[:200])
    assert torch.equal(sp.tokens, ar.tokens[:200])


def test_threshold_zero_accepts_everything_and_one_nothing(setup):
    model, draft, embeds, mask, ar = setup
    K = 7
    everything = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=K, num_slots=64,
                                                           acceptance="threshold:0.0")).run(embeds[:64], mask[:64])
    assert (everything.counters["num_accepted_layers"] == K).all()
    assert (everything.counters["num_main_passes"] == 2).all()
    # control: accepting a random draft wholesale really changes the output (the equality
    # tests above could fail)
    assert not torch.equal(everything.tokens, ar.tokens[:64])
    nothing = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=K, num_slots=64,
                                                        acceptance="threshold:1.0")).run(embeds[:64], mask[:64])
    assert (nothing.counters["num_accepted_layers"] == 0).all()
    assert torch.equal(nothing.tokens, ar.tokens[:64])   # replacements are the main model's argmax


def test_parallel_is_one_pass(setup):
    model, _, embeds, mask, _ = setup
    out = DecodeEngine(model, None, DecodeSettings(mode="parallel", num_slots=32)).run(embeds[:40], mask[:40])
    assert out.tokens.shape == (40, 8, 16, 8)
    assert (out.counters["num_main_passes"] == 1).all()


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="threshold:tau"):
        DecodeSettings(acceptance="greedy")
    with pytest.raises(ValueError, match="outside"):
        DecodeSettings(acceptance="threshold:1.5")
    with pytest.raises(ValueError, match="expected one of"):
        DecodeSettings(mode="beam")
    model, draft = tiny_float64()
    with pytest.raises(ValueError, match="draft_layers=8"):
        DecodeEngine(model, draft, DecodeSettings(draft_layers=8))
    with pytest.raises(ValueError, match="needs a draft"):
        DecodeEngine(model, None, DecodeSettings(mode="speculative"))
