"""The static-buffer passes of graphs.py give exactly the eager engine's tokens.

`static` runs the very closures that `cuda_graph` captures, on the same buffers, eagerly: on a
CPU this proves the bookkeeping a graph depends on (bucketing, padding rows with the scratch
slot, copying inputs in place, fixed positions). The GPU tests compare the captured graphs
with the eager path; they are skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

from rsd_ray.decoding.graphs import StaticPasses, bucket_for, bucket_sizes
from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings, Workspace
from rsd_ray.decoding.row_cache import RowOffsetCache, prefill_mask
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel, OracleDraft
from rsd_ray.policy.modeling_rsd import RSDModel

BUCKETS = (1, 4, 8)       # with S = 12: buckets 1, 4, 8, 12


def tiny(dtype=torch.float64):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = RSDConfig.tiny(dtype="float64", patch_size=56, max_instruction_tokens=8)
    return RSDModel(cfg).to(dtype).eval(), DraftModel(cfg).to(dtype).eval()


def prefixes(cfg, n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, cfg.prefix_length, cfg.hidden_size, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.ones(n, cfg.prefix_length, dtype=torch.bool)
    lengths = torch.randint(1, cfg.max_instruction_tokens + 1, (n,), generator=g)
    mask[:, -cfg.max_instruction_tokens:] = torch.arange(cfg.max_instruction_tokens)[None] < lengths[:, None]
    return embeds, mask


@pytest.fixture(scope="module")
def setup():
    model, draft = tiny()
    embeds, mask = prefixes(model.config, 30)
    ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=12)).run(embeds, mask)
    return model, draft, embeds, mask, ar


def settings(graph_mode: str, **kw) -> DecodeSettings:
    return DecodeSettings(num_slots=12, graph_mode=graph_mode, graph_buckets=BUCKETS, **kw)


def test_bucket_helpers_and_bad_settings():
    assert bucket_sizes(12, (1, 8, 32, 64)) == (1, 8, 12)
    assert bucket_sizes(64) == (1, 8, 32, 64)
    assert bucket_for(5, (1, 8, 12)) == 8 and bucket_for(1, (1, 8, 12)) == 1
    with pytest.raises(ValueError, match="largest bucket 12"):
        bucket_for(13, (1, 8, 12))
    with pytest.raises(ValueError, match="expected one of eager, static, cuda_graph"):
        DecodeSettings(graph_mode="graphs")
    with pytest.raises(ValueError, match="positive slot counts"):
        DecodeSettings(graph_buckets=(0, 8))


@pytest.mark.parametrize("mode", ["parallel", "autoregressive"])
def test_static_passes_equal_eager_without_draft(setup, mode):
    model, _, embeds, mask, ar = setup
    eager = DecodeEngine(model, None, DecodeSettings(mode=mode, num_slots=12)).run(embeds, mask)
    engine = DecodeEngine(model, None, settings("static", mode=mode))
    static = engine.run(embeds, mask)                    # 30 chunks through 12 slots: refills
    assert torch.equal(static.tokens, eager.tokens)
    assert torch.equal(static.counters["num_main_passes"], eager.counters["num_main_passes"])
    # fewer chunks than slots: a smaller bucket, on the same (reused) buffers
    assert torch.equal(engine.run(embeds[3:6], mask[3:6]).tokens, eager.tokens[3:6])
    if mode == "autoregressive":
        assert torch.equal(static.tokens, ar.tokens)


@pytest.mark.parametrize("K", [1, 3, 7])
def test_static_passes_equal_eager_speculative(setup, K):
    model, draft, embeds, mask, ar = setup
    runs = {}
    for graph_mode in ("eager", "static"):
        oracle = OracleDraft(draft, ar.tokens, copy_prob=0.6, seed=K)
        runs[graph_mode] = DecodeEngine(model, oracle, settings(graph_mode, mode="speculative",
                                                                draft_layers=K)).run(embeds, mask)
    assert torch.equal(runs["static"].tokens, ar.tokens)
    for name in ("num_main_passes", "num_accepted_layers"):
        assert torch.equal(runs["static"].counters[name], runs["eager"].counters[name])
    # rows really took different routes (verification of some rows, steps of others)
    assert len(set(runs["static"].counters["num_accepted_layers"].tolist())) > 1


def test_static_sampled_speculative_equals_eager(setup):
    model, draft, embeds, mask, _ = setup
    seeds = torch.arange(30) * 11
    out = {m: DecodeEngine(model, draft, settings(m, mode="speculative", draft_layers=3, sample=True))
           .run(embeds, mask, seeds) for m in ("eager", "static")}
    assert torch.equal(out["static"].tokens, out["eager"].tokens)


def test_step_buckets_shrink_and_buffers_stay_put(setup, monkeypatch):
    """The step pass covers only the smallest bucket holding every stepping slot, and every
    pass reads the same buffer objects run after run (what a captured graph needs)."""
    model, draft, embeds, mask, ar = setup
    seen: list[int] = []
    original = StaticPasses.step

    def spy(self, num_done, *args):
        seen.append(num_done.shape[0])
        return original(self, num_done, *args)

    monkeypatch.setattr(StaticPasses, "step", spy)
    workspace = Workspace()
    engine = DecodeEngine(model, None, settings("static", mode="autoregressive"), workspace=workspace)
    assert torch.equal(engine.run(embeds[:14], mask[:14]).tokens, ar.tokens[:14])
    assert seen[0] == 12 and seen[-1] == 4 and set(seen) <= {1, 4, 8, 12}
    (passes,) = workspace.passes.values()
    addresses = {key: {name: t.data_ptr() for name, t in p.inputs.items()} for key, p in passes.passes.items()}
    assert {key[:2] for key in addresses} >= {("prefill", 12), ("step", 1), ("step", 12)}
    # a second engine (another mode) on the same workspace reuses the cache and the passes
    other = DecodeEngine(model, draft, settings("static", mode="speculative", draft_layers=3), workspace=workspace)
    other.run(embeds[:5], mask[:5])
    assert len(workspace.passes) == 1
    for key, ptrs in addresses.items():
        assert ptrs == {name: t.data_ptr() for name, t in passes.passes[key].inputs.items()}
    assert ("verify", 12, 3) in passes.passes


@torch.no_grad()
def test_padded_subset_rows_touch_only_the_scratch_slot():
    """A prefill of 3 rows in a bucket of 4 writes those rows' cache and the scratch slot, and
    not one value of any other slot."""
    model, _ = tiny()
    c = model.config
    P, T, S = c.prefix_length, c.chunk_steps, 6
    max_len = P + (c.num_rfsq_layers + 1) * T
    cache = RowOffsetCache(model.backbone.config, S + 1, max_len, T, torch.float64)
    g = torch.Generator().manual_seed(3)
    for layer in cache.layers:
        layer.keys.copy_(torch.randn(layer.keys.shape, generator=g, dtype=torch.float64))
    before = [layer.keys.clone() for layer in cache.layers]
    passes = StaticPasses(model, cache, S, P, max_len, buckets=(1, 4))
    rows = torch.tensor([5, 0, 2])
    x = torch.randn(3, P + T, c.hidden_size, generator=g, dtype=torch.float64)
    kmask = torch.ones(3, P + T, dtype=torch.bool)
    h0, logits = passes.prefill(rows, x, prefill_mask(kmask, torch.float64))
    ref = model.run_backbone(x, torch.arange(P + T)[None].expand(3, -1), prefill_mask(kmask, torch.float64))
    torch.testing.assert_close(h0, ref[:, P:], rtol=0, atol=1e-12)
    assert logits.shape == (3, T, c.latent_dim * c.num_levels)
    for layer, old in zip(cache.layers, before):
        changed = (layer.keys != old).flatten(1).any(dim=1)
        assert changed.tolist() == [True, False, True, False, False, True, True]   # rows 0, 2, 5 + scratch 6
    with pytest.raises(ValueError, match="expected S \\+ 1 = 7"):
        StaticPasses(model, RowOffsetCache(model.backbone.config, S, max_len, T, torch.float64), S, P, max_len)


def test_cuda_graph_mode_falls_back_to_static_on_cpu(setup):
    model, _, embeds, mask, ar = setup
    engine = DecodeEngine(model, None, settings("cuda_graph", mode="autoregressive"))
    with pytest.warns(UserWarning, match="running the same static passes eagerly"):
        out = engine.run(embeds[:4], mask[:4])
    assert engine.graph_mode == "static"
    assert torch.equal(out.tokens, ar.tokens[:4])


# ---- GPU ----------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode,K", [("parallel", 0), ("autoregressive", 0), ("speculative", 3), ("speculative", 7)])
def test_cuda_graphs_equal_eager_float64(mode, K):
    model, draft = tiny()
    model, draft = model.cuda(), draft.cuda()
    embeds, mask = prefixes(model.config, 40)
    ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=16)).run(embeds, mask)
    out = {}
    for graph_mode in ("eager", "cuda_graph"):
        d = OracleDraft(draft, ar.tokens, copy_prob=0.6, seed=K) if mode == "speculative" else None
        engine = DecodeEngine(model, d, DecodeSettings(mode=mode, draft_layers=max(K, 1), num_slots=16,
                                                       graph_mode=graph_mode))
        out[graph_mode] = engine.run(embeds, mask)
        assert engine.graph_mode == graph_mode
    assert torch.equal(out["cuda_graph"].tokens, out["eager"].tokens)
    assert torch.equal(out["cuda_graph"].counters["num_main_passes"], out["eager"].counters["num_main_passes"])


@pytest.mark.gpu
@cuda
def test_graph_replay_equals_static_bfloat16_bit_for_bit():
    """Same kernels, same shapes: a replay after new inputs were copied in place gives the bits
    the eager run of the same closure gives (so the graph reads the buffers, not stale copies)."""
    model, draft = tiny(torch.bfloat16)
    model, draft = model.cuda(), draft.cuda()
    embeds, mask = prefixes(model.config, 20, dtype=torch.bfloat16)
    out = {}
    for graph_mode in ("static", "cuda_graph"):
        engine = DecodeEngine(model, draft, DecodeSettings(mode="speculative", draft_layers=3, num_slots=8,
                                                           graph_mode=graph_mode))
        out[graph_mode] = [engine.run(embeds[i:i + 10], mask[i:i + 10]) for i in (0, 10)]
    for a, b in zip(out["static"], out["cuda_graph"]):
        assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(out["cuda_graph"][0].tokens, out["cuda_graph"][1].tokens)
