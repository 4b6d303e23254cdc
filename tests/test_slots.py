"""Slots progress independently, refill without disturbing other rows, and the per-row-offset
cache computes what a plain full-sequence forward computes."""
from __future__ import annotations

import pytest
import torch

from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
from rsd_ray.decoding.row_cache import RowOffsetCache, prefill_mask, window_inputs
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel, OracleDraft
from rsd_ray.policy.modeling_rsd import RSDModel


def tiny():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = RSDConfig.tiny(dtype="float64", patch_size=56, max_instruction_tokens=8)
    return RSDModel(cfg).double().eval(), DraftModel(cfg).double().eval()


def prefixes(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, cfg.prefix_length, cfg.hidden_size, generator=g, dtype=torch.float64)
    mask = torch.ones(n, cfg.prefix_length, dtype=torch.bool)
    mask[: n // 2, -3:] = False           # half the rows have a padded instruction
    return embeds, mask


def test_refilled_slots_give_each_row_its_solo_result():
    model, draft = tiny()
    embeds, mask = prefixes(model.config, 10)
    solo = torch.stack([DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=1))
                        .run(embeds[i:i + 1], mask[i:i + 1]).tokens[0] for i in range(10)])
    # 3 slots for 10 chunks: slots are refilled while the others are mid-chunk
    engine = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=3))
    ar = engine.run(embeds, mask)
    assert torch.equal(ar.tokens, solo)
    # the same engine again (its static cache holds the last run's K/V) with fewer chunks than slots
    assert torch.equal(engine.run(embeds[7:9], mask[7:9]).tokens, solo[7:9])
    # speculative rows accept different numbers of layers, so they finish (and refill) at
    # different passes; every row still gets exactly its own result
    oracle = OracleDraft(draft, solo, copy_prob=0.5, seed=1)
    sp = DecodeEngine(model, oracle, DecodeSettings(mode="speculative", draft_layers=3, num_slots=3)).run(embeds, mask)
    assert torch.equal(sp.tokens, solo)
    assert len(set(sp.counters["num_main_passes"].tolist())) > 1


def test_padding_mask_is_honoured():
    """A padded instruction token must not influence the chunk (mask), but a real one must."""
    model, _ = tiny()
    embeds, mask = prefixes(model.config, 4)
    engine = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=4))
    base = engine.run(embeds, mask).tokens
    changed = embeds.clone()
    changed[:, -1] += 5.0                 # rows 0, 1: a padded position; rows 2, 3: a real one
    out = engine.run(changed, mask).tokens
    assert torch.equal(out[:2], base[:2])
    assert not torch.equal(out[2:], base[2:])


@torch.no_grad()
def test_row_offset_cache_matches_a_full_forward():
    """Rows at different blocks in one static step equal each row's full uncached forward."""
    model, _ = tiny()
    cfg = model.config
    P, T, S, H = cfg.prefix_length, cfg.chunk_steps, 3, cfg.hidden_size
    max_len = P + (cfg.num_rfsq_layers + 1) * T
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(S, P + 4 * T, H, generator=g, dtype=torch.float64)   # each row's true inputs
    cache = RowOffsetCache(model.backbone.config, S, max_len, T, torch.float64)
    cache.begin_prefill(torch.arange(S))
    ones = torch.ones(S, P + T, dtype=torch.bool)
    model.run_backbone(seq[:, :P + T], torch.arange(P + T)[None].expand(S, -1), prefill_mask(ones, torch.float64), cache)
    key_mask = torch.ones(S, max_len, dtype=torch.bool)
    done = torch.tensor([1, 1, 1])
    worst = 0.0
    # rows advance on different schedules: row 0 every step, row 1 every other, row 2 idle then on
    for active in ([1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1]):
        active = torch.tensor(active, dtype=torch.bool)
        offsets = P + done * T
        x = torch.stack([seq[r, offsets[r]:offsets[r] + T] if offsets[r] + T <= seq.shape[1]
                         else torch.zeros(T, H, dtype=torch.float64) for r in range(S)])
        pos, mask = window_inputs(offsets, torch.where(active, T, 0), T, max_len, torch.float64, key_mask)
        cache.begin_window(pos)
        h = model.run_backbone(x, pos, mask, cache)
        for r in torch.nonzero(active).flatten().tolist():
            n = int(offsets[r]) + T
            ref = model.run_backbone(seq[r:r + 1, :n], torch.arange(n)[None],
                                     prefill_mask(torch.ones(1, n, dtype=torch.bool), torch.float64))
            worst = max(worst, (h[r] - ref[0, -T:]).abs().max().item())
        done = done + active.long()
    assert done.tolist() == [4, 3, 3]
    assert worst < 1e-10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speculative_equals_autoregressive_on_cuda():
    model, draft = tiny()
    model, draft = model.cuda(), draft.cuda()
    embeds, mask = prefixes(model.config, 64)
    ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=16)).run(embeds, mask)
    oracle = OracleDraft(draft, ar.tokens, copy_prob=0.6, seed=2)
    sp = DecodeEngine(model, oracle, DecodeSettings(mode="speculative", draft_layers=3, num_slots=16)).run(embeds, mask)
    assert torch.equal(sp.tokens, ar.tokens)
