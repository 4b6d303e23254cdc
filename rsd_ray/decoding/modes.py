"""The decoding engine: parallel, autoregressive and speculative decoding of RFSQ layers.

One engine, the same weights, three modes (see ARCHITECTURE.md, "The policy and its three
decoding modes"). Passes of the main model ("main passes") per chunk:

    parallel        1   prefix + L blocks of learned queries, all layers at once
    autoregressive  L   prefill (prefix + block 0 -> layer 0), then L-1 cached block steps
    speculative     2 + L - max(2, a + 1), a = accepted draft layers (2 when K = L-1, a = K)

Speculative, per chunk: the prefill gives the main model's layer-0 distribution and block-0
hidden states; the draft proposes layers 0..K-1 from those hidden states; layer 0 is judged
against the prefill. If it is accepted, ONE verification pass feeds blocks 1..K (inputs: draft
layers 0..K-1) and judges draft layers 1..K-1; the longest accepted run is kept, and the
verification output at the first rejected block (or block K: the *bonus* layer) is the main
model's next layer. If layer 0 is rejected, that pass is an ordinary block step for the row.
The remaining layers are ordinary block steps.

Fixed-size batching: S slots (slots.py) and a static KV cache with per-row offsets
(row_cache.py). The block step -- the pass a chunk repeats, and the one a CUDA graph captures --
always runs over all S slots with window T: slot r computes block m_r at its own offset
P + m_r*T, idle slots have no valid positions. A finished slot is refilled with the next waiting
observation before the next step; the new rows' prefill (width P+T) and verification (fixed
width K*T) run on those rows only, outside the static part, so a row that is verifying never
makes the stepping rows pay for a K*T-wide pass, and a row that rejected early never waits
for one that accepted everything.

`DecodeSettings.graph_mode` chooses how each pass runs (graphs.py): `eager` (build tensors,
call the backbone), `static` (fixed-shape passes on static buffers per slot-count bucket, run
eagerly) or `cuda_graph` (those passes captured and replayed). Same tokens on every path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rsd_ray.decoding.acceptance import choose_tokens, judge, parse_acceptance, probabilities
from rsd_ray.decoding.graphs import (DEFAULT_BUCKETS, GRAPH_MODES, StaticPasses, attention_backends, bucket_for,
                                     bucket_sizes, effective_graph_mode)
from rsd_ray.decoding.row_cache import RowOffsetCache, prefill_mask, window_inputs
from rsd_ray.decoding.slots import COUNTERS, DONE, EMPTY, STEP, VERIFY, SlotTable

MODES = ("parallel", "autoregressive", "speculative")


@dataclass(frozen=True)
class DecodeSettings:
    """How the engine decodes. `from_config` accepts rsd_ray.config.DecodeConfig too."""

    mode: str = "speculative"
    draft_layers: int = 3            # K
    acceptance: str = "exact"        # exact | threshold:tau
    sample: bool = False             # greedy (False) or sampled
    temperature: float = 1.0         # sampled only: logits / temperature
    num_slots: int = 32              # S (PolicyConfig.max_batch's default)
    # eager | static | cuda_graph (graphs.py); same tokens on every path, only speed differs
    graph_mode: str = "eager"
    graph_buckets: tuple[int, ...] = DEFAULT_BUCKETS   # slot-count buckets of the static passes

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"decode mode={self.mode!r}; expected one of {', '.join(MODES)}")
        parse_acceptance(self.acceptance)
        if self.num_slots < 1:
            raise ValueError(f"num_slots={self.num_slots}; expected >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; expected > 0")
        if self.graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode={self.graph_mode!r}; expected one of {', '.join(GRAPH_MODES)}")
        bucket_sizes(self.num_slots, tuple(self.graph_buckets))      # raises on a bad bucket

    @classmethod
    def from_config(cls, decode: Any = None, num_slots: int | None = None) -> "DecodeSettings":
        if decode is None:
            decode = cls()
        values = {name: getattr(decode, name) for name in
                  ("mode", "draft_layers", "acceptance", "sample", "temperature", "num_slots", "graph_mode",
                   "graph_buckets") if hasattr(decode, name)}
        if num_slots is not None:
            values["num_slots"] = num_slots
        return cls(**values)


class Drafter(Protocol):
    def propose(self, hidden: torch.Tensor, num_layers: int, row_ids: torch.Tensor | None = None,
                uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] -> tokens [B, T, D, K], probs [B, T, D, K, V]."""


@dataclass
class DecodeResult:
    """Per-observation output of `DecodeEngine.run` (N observations)."""

    tokens: torch.Tensor                  # [N, T, D, L] int64 in [0, V)
    counters: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> [N] float64 (COUNTERS)
    wall_ms: float = 0.0                  # the whole run

    def counter(self, name: str, index: int) -> float:
        return float(self.counters[name][index])


class Workspace:
    """What engines over one model may share: the row-offset cache (S + 1 slots, the last one
    scratch) and the static passes (graphs.py). Engines sharing one must not run at the same
    time; the benchmark runs every mode over one 7B-sized cache this way."""

    def __init__(self):
        self.cache: RowOffsetCache | None = None
        self.passes: dict[tuple, StaticPasses] = {}


class DecodeEngine:
    """Decodes RFSQ tokens for a queue of prefixes with S static slots.

    model: an RSDModel (config, start_inputs, block_inputs, parallel_inputs, logits, head,
    run_backbone, backbone.config); draft: a Drafter (speculative mode only); workspace: share
    the cache and captured passes with other engines over the same model (default: its own).
    """

    def __init__(self, model, draft: Drafter | None, settings: DecodeSettings, workspace: Workspace | None = None):
        self.model, self.draft, self.settings = model, draft, settings
        self.workspace = workspace if workspace is not None else Workspace()
        self.rule = parse_acceptance(settings.acceptance)
        c = model.config
        self.T, self.D, self.L, self.V = c.chunk_steps, c.latent_dim, c.num_rfsq_layers, c.num_levels
        self.K = settings.draft_layers if settings.mode == "speculative" else 0
        if settings.mode == "speculative":
            if draft is None:
                raise ValueError("decode mode='speculative' needs a draft model; none was given")
            if not 1 <= self.K < self.L:
                raise ValueError(f"draft_layers={self.K}; expected 1..{self.L - 1}")
        self._passes: StaticPasses | None = None    # set per run when graph_mode != eager
        self._graph_mode, self._graph_mode_for = settings.graph_mode, None

    # ---- helpers ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.settings.sample and self.settings.temperature != 1.0:
            logits = logits / self.settings.temperature
        return probabilities(logits)

    def _uniforms(self, table: SlotTable, slots: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
        return table.uniforms(slots, shape, torch.float64) if self.settings.sample else None

    @property
    def graph_mode(self) -> str:
        """The path that runs on this device: cuda_graph falls back to static off CUDA."""
        if self._graph_mode_for != self.device:
            self._graph_mode = effective_graph_mode(self.settings.graph_mode, self.device)   # warns once
            self._graph_mode_for = self.device
        return self._graph_mode

    def _get_cache(self, num_slots: int, max_len: int, window: int) -> RowOffsetCache:
        """S + 1 slots: the last is the scratch slot that padded subset passes write to."""
        ws = self.workspace
        c = ws.cache
        if c is None or (c.num_slots, c.max_len, c.window, c.dtype) != (num_slots + 1, max_len, window, self.dtype):
            ws.cache = None
            ws.passes = {k: v for k, v in ws.passes.items() if v.cache is None}   # they point at the old cache
            ws.cache = RowOffsetCache(self.model.backbone.config, num_slots + 1, max_len, window,
                                      self.dtype, self.device)
        return ws.cache

    def _get_passes(self, prefix_length: int, max_len: int | None) -> StaticPasses:
        """Static passes for this shape (max_len None: parallel passes, no cache)."""
        s = self.settings
        use_graphs = self.graph_mode == "cuda_graph"
        cache = self._get_cache(s.num_slots, max_len, self.T) if max_len is not None else None
        key = (prefix_length, max_len, s.num_slots, tuple(s.graph_buckets), use_graphs, self.dtype)
        ws = self.workspace
        if key not in ws.passes:
            ws.passes[key] = StaticPasses(self.model, cache, s.num_slots, prefix_length,
                                          max_len if max_len is not None else 0, tuple(s.graph_buckets), use_graphs)
        return ws.passes[key]

    @torch.inference_mode()
    def static_passes(self, prefix_length: int, parallel: bool = False) -> StaticPasses:
        """This engine's static passes for prefixes of length P, built (and in cuda_graph mode
        captured) now: prefill, step and (speculative) verify, or with parallel=True the
        parallel-mode passes. For benchmarks that time one pass; call only between runs."""
        if self.graph_mode == "eager":
            raise ValueError("static_passes() needs graph_mode 'static' or 'cuda_graph'; this engine is eager")
        max_len = None if parallel else prefix_length + (self.L + 1) * self.T
        passes = self._get_passes(prefix_length, max_len)
        with attention_backends(self.device):
            passes.prepare(("parallel",) if parallel else ("prefill", "step", "verify"), self.K)
        return passes

    # ---- entry point --------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, seeds: torch.Tensor | None = None,
            row_ids: torch.Tensor | None = None) -> DecodeResult:
        """prefix_embeds [N, P, H]; prefix_mask [N, P] bool (False = padding); seeds [N] long
        (sampled decoding; default 0..N-1); row_ids [N] long, passed to the draft (default 0..N-1).
        Returns tokens [N, T, D, L] and per-observation counters."""
        hidden = self.model.config.hidden_size
        if prefix_embeds.dim() != 3 or prefix_embeds.shape[2] != hidden:
            raise ValueError(f"prefix_embeds has shape {tuple(prefix_embeds.shape)}; expected [N, P, H] with H={hidden}")
        N, P, H = prefix_embeds.shape
        if prefix_mask.shape != (N, P):
            raise ValueError(f"prefix_mask has shape {tuple(prefix_mask.shape)}; expected [N, P] = [{N}, {P}]")
        if seeds is None:
            seeds = torch.arange(N)
        if row_ids is None:
            row_ids = torch.arange(N)
        prefix_embeds = prefix_embeds.to(device=self.device, dtype=self.dtype)
        prefix_mask = prefix_mask.to(self.device)
        start = self._now()
        with attention_backends(self.device):
            if self.settings.mode == "parallel":
                result = self._run_parallel(prefix_embeds, prefix_mask, seeds)
            else:
                result = self._run_slots(prefix_embeds, prefix_mask, seeds, row_ids)
        result.wall_ms = (self._now() - start) * 1e3
        return result

    # ---- parallel -----------------------------------------------------------------------
    def _run_parallel(self, embeds, pmask, seeds) -> DecodeResult:
        N, P, _ = embeds.shape
        T, D, L = self.T, self.D, self.L
        tokens = torch.zeros(N, T, D, L, dtype=torch.long)
        counters = {name: torch.zeros(N, dtype=torch.float64) for name in COUNTERS}
        counters["num_accepted_layers"][:] = -1
        S = self.settings.num_slots
        passes = None
        if self.graph_mode != "eager":
            passes = self._get_passes(P, None)
            passes.prepare(("parallel",))
        for lo in range(0, N, S):
            hi = min(N, lo + S)
            b = hi - lo
            t0 = self._now()
            x = torch.cat([embeds[lo:hi], self.model.parallel_inputs(b).to(embeds.dtype)], dim=1)   # [b, P+L*T, H]
            kmask = torch.cat([pmask[lo:hi], torch.ones(b, L * T, dtype=torch.bool, device=pmask.device)], dim=1)
            mask = prefill_mask(kmask, embeds.dtype)
            if passes is not None:
                logits = passes.parallel(x, mask).unflatten(-1, (D, self.V))       # [b, L*T, D, V]
            else:
                pos = torch.arange(P + L * T, device=embeds.device)[None].expand(b, -1)
                logits = self.model.logits(self.model.run_backbone(x, pos, mask, None)[:, P:])
            probs = self._probs(logits)                                           # [b, L*T, D, V]
            probs = probs.unflatten(1, (L, T)).permute(0, 2, 3, 1, 4)             # [b, T, D, L, V]
            u = None
            if self.settings.sample:
                u = torch.stack([torch.rand(T, D, L, generator=torch.Generator().manual_seed(int(s)),
                                            dtype=torch.float64) for s in seeds[lo:hi].tolist()]).to(self.device)
            tokens[lo:hi] = choose_tokens(probs, u).cpu()
            ms = (self._now() - t0) * 1e3
            counters["step_ms"][lo:hi] = ms
            counters["num_main_passes"][lo:hi] = 1
        return DecodeResult(tokens, counters)

    # ---- autoregressive and speculative -------------------------------------------------
    def _run_slots(self, embeds, pmask, seeds, row_ids) -> DecodeResult:
        N, P, _ = embeds.shape
        T, D, L, V, K = self.T, self.D, self.L, self.V, self.K
        # a run with fewer chunks than slots uses the first N slots of the same static cache
        S = min(self.settings.num_slots, N)
        # verification writes [P+T, P+(K+1)*T) <= P+L*T; an idle slot at m = L pads [P+L*T, P+(L+1)*T)
        max_len = P + (L + 1) * T
        self._P, self._max_len = P, max_len
        cache = self._get_cache(self.settings.num_slots, max_len, T)
        self._passes = None
        if self.graph_mode != "eager":
            # capture now, while no slot holds a chunk (graphs.py); the table spans a whole bucket
            self._passes = self._get_passes(P, max_len)
            self._passes.prepare(("prefill", "step", "verify"), K)
            S = bucket_for(S, self._passes.sizes)
        table = SlotTable(S, T, D, L, max(K, 1), V, max_len, self.device)
        tokens = torch.zeros(N, T, D, L, dtype=torch.long)
        counters = {name: torch.zeros(N, dtype=torch.float64) for name in COUNTERS}
        next_row = 0
        while True:
            free = table.free_slots()
            take = min(len(free), N - next_row)
            if take:
                slots = free[:take]
                rows = torch.arange(next_row, next_row + take)
                next_row += take
                table.fill(slots, rows, seeds[rows] if self.settings.sample else None)
                self._prefill(table, cache, slots, embeds[rows.to(self.device)], pmask[rows.to(self.device)],
                              row_ids[rows])
                verify = torch.nonzero(table.phase == VERIFY).flatten()
                if len(verify):
                    self._verify(table, cache, verify)
            if bool((table.phase == STEP).any()):
                self._step_pass(table, cache)
            done = torch.nonzero(table.phase == DONE).flatten()
            if len(done):
                rows = table.row[done].cpu()
                tokens[rows] = table.tokens[done].cpu()
                for name in COUNTERS:
                    counters[name][rows] = table.counters[name][done.cpu()]
                table.release(done)
            if next_row >= N and bool((table.phase == EMPTY).all()):
                break
        return DecodeResult(tokens, counters)

    def _prefill(self, table: SlotTable, cache: RowOffsetCache, slots: torch.Tensor, embeds: torch.Tensor,
                 pmask: torch.Tensor, row_ids: torch.Tensor) -> None:
        """Prefix + block 0 for the new rows `slots` [b]: embeds [b, P, H], pmask [b, P]."""
        b, P, _ = embeds.shape
        T, D, K = self.T, self.D, self.K
        t0 = self._now()
        x = torch.cat([embeds, self.model.start_inputs(b).to(embeds.dtype)], dim=1)        # [b, P+T, H]
        kmask = torch.cat([pmask, torch.ones(b, T, dtype=torch.bool, device=pmask.device)], dim=1)
        mask = prefill_mask(kmask, embeds.dtype)
        if self._passes is not None:
            h0, logits = self._passes.prefill(slots, x, mask)                             # [b, T, H], [b, T, D*V]
            logits = logits.unflatten(-1, (D, self.V))
        else:
            pos = torch.arange(P + T, device=embeds.device)[None].expand(b, -1)
            cache.begin_prefill(slots)
            h0 = self.model.run_backbone(x, pos, mask, cache)[:, P:]                      # [b, T, H]
            logits = self.model.logits(h0)
        p0 = self._probs(logits)                                                          # [b, T, D, V]
        table.key_mask[slots] = True
        table.key_mask[slots, :P] = pmask
        table.num_done[slots] = 1
        if K == 0:
            table.tokens[slots, :, :, 0] = choose_tokens(p0, self._uniforms(table, slots, (T, D)))
            table.phase[slots] = STEP
            table.add("step_ms", slots, (self._now() - t0) * 1e3)
            table.add("num_main_passes", slots, 1)
            return
        t1 = self._now()
        table.add("step_ms", slots, (t1 - t0) * 1e3)
        table.add("num_main_passes", slots, 1)
        draft_tokens, draft_probs = self.draft.propose(h0, K, row_ids, self._uniforms(table, slots, (T, D, K)))
        table.draft_tokens[slots] = draft_tokens
        if self.settings.sample:
            table.draft_probs[slots] = draft_probs.to(table.draft_probs.dtype)
        verdict = judge(self.rule, draft_tokens[..., :1], draft_probs[..., :1, :], p0[..., None, :],
                        self._uniforms(table, slots, (T, D, 1)), self._uniforms(table, slots, (T, D, 1)))
        table.tokens[slots, :, :, 0] = verdict.tokens[..., 0]
        accepted = verdict.layer_accepted[:, 0]                                           # [b] bool
        table.counters["num_accepted_layers"][slots.cpu()] = accepted.double().cpu()
        # with K = 1 nothing is left to verify: the next pass is an ordinary step either way
        table.phase[slots] = torch.where(accepted & (K > 1), VERIFY, STEP)
        table.add("draft_ms", slots, (self._now() - t1) * 1e3)

    def _verify(self, table: SlotTable, cache: RowOffsetCache, rows: torch.Tensor) -> None:
        """ONE pass for the slots `rows` [b] (layer 0 accepted): blocks 1..K, inputs draft layers
        0..K-1; judges draft layers 1..K-1 and takes the main model's next layer."""
        T, D, K, P = self.T, self.D, self.K, self._P
        b = len(rows)
        t0 = self._now()
        offsets = torch.full((b,), P + T, dtype=torch.long, device=self.device)      # block 1
        prev = table.draft_tokens[rows]                                                  # [b, T, D, K]
        layer_ids = torch.arange(1, K + 1, device=self.device)[None].expand(b, -1)       # [b, K]
        x = self.model.block_inputs(prev, layer_ids).to(self.dtype)                      # [b, K*T, H]
        pos, mask = window_inputs(offsets, torch.full_like(offsets, K * T), K * T, self._max_len,
                                  self.dtype, table.key_mask[rows])
        if self._passes is not None:
            logits = self._passes.verify(rows, x, mask, K).unflatten(-1, (D, self.V))
        else:
            cache.begin_rows(rows, pos)
            logits = self.model.logits(self.model.run_backbone(x, pos, mask, cache))
        p = self._probs(logits)                                                          # [b, K*T, D, V]
        p = p.unflatten(1, (K, T)).permute(0, 2, 3, 1, 4)                               # [b, T, D, K, V]
        verdict = judge(self.rule, prev[..., 1:K], table.draft_probs[rows][..., 1:K, :], p[..., :K - 1, :],
                        self._uniforms(table, rows, (T, D, K - 1)), self._uniforms(table, rows, (T, D, K - 1)))
        bonus = choose_tokens(p[..., K - 1, :], self._uniforms(table, rows, (T, D)))    # [b, T, D]
        candidates = torch.cat([verdict.tokens, bonus[..., None]], dim=3)               # layers 1..K
        accepted = verdict.num_accepted                                                 # [b] in 0..K-1
        keep = torch.arange(K, device=self.device)[None] <= accepted[:, None]           # [b, K]
        sub = table.tokens[rows]
        sub[..., 1:K + 1] = torch.where(keep[:, None, None, :], candidates, sub[..., 1:K + 1])
        table.tokens[rows] = sub
        table.num_done[rows] = accepted + 2
        table.counters["num_accepted_layers"][rows.cpu()] = (accepted + 1).double().cpu()
        table.phase[rows] = torch.where(table.num_done[rows] >= self.L, DONE, STEP)
        table.add("verify_ms", rows, (self._now() - t0) * 1e3)
        table.add("num_main_passes", rows, 1)

    def _step_pass(self, table: SlotTable, cache: RowOffsetCache) -> None:
        """One static-shape pass over slots [0, b), window T: every STEP slot computes its next
        block (one RFSQ layer); other slots are idle (no valid positions). Eager: b = S; static
        passes: b = the smallest bucket holding every STEP slot, inputs built inside the pass."""
        T, D, L, P = self.T, self.D, self.L, self._P
        step = table.phase == STEP                                                      # [S]
        t0 = self._now()
        rows = torch.nonzero(step).flatten()
        if self._passes is not None:
            # num_done <= L keeps every write position below Lalloc = P + (L+1)*T
            b = bucket_for(int(rows[-1]) + 1, self._passes.sizes)
            logits = self._passes.step(table.num_done[:b], step[:b], table.tokens[:b], table.key_mask[:b])
            logits = logits.unflatten(-1, (D, self.V))
            m = table.num_done
        else:
            S = table.num_slots
            m = table.num_done                                                          # [S]
            offsets = P + m * T
            num_valid = torch.where(step, T, 0)
            last = (m - 1).clamp(min=0)[:, None, None, None].expand(S, T, D, 1)
            prev = table.tokens.gather(3, last)                                         # [S, T, D, 1]
            layer_ids = m.clamp(max=L - 1)[:, None]                                     # [S, 1]
            x = self.model.block_inputs(prev, layer_ids).to(self.dtype)                # [S, T, H]
            pos, mask = window_inputs(offsets, num_valid, T, self._max_len, self.dtype, table.key_mask)
            cache.begin_window(pos)
            logits = self.model.logits(self.model.run_backbone(x, pos, mask, cache))
        probs = self._probs(logits)                                                     # [b, T, D, V]
        new = choose_tokens(probs[rows], self._uniforms(table, rows, (T, D)))           # [b, T, D]
        sub = table.tokens[rows]
        sub.scatter_(3, m[rows][:, None, None, None].expand(-1, T, D, 1), new[..., None])
        table.tokens[rows] = sub
        table.num_done[rows] += 1
        table.phase[rows] = torch.where(table.num_done[rows] >= L, DONE, STEP)
        table.add("step_ms", rows, (self._now() - t0) * 1e3)
        table.add("num_main_passes", rows, 1)
