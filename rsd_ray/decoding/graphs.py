"""Fixed-shape backbone passes on static buffers, replayed from CUDA graphs.

Why: an eager 7B block step at batch 1 costs ~25 ms on an H100 against ~6.4 ms to read the
weights once; most of the difference is the CPU launching ~500 kernels. A CUDA graph replays
them all with one launch. A graph reads and writes fixed addresses, so every input of a
captured pass lives in a buffer allocated once; a pass is run by copying its inputs into those
buffers in place, then replaying. `DecodeSettings.graph_mode` picks the path:

    eager       the engine builds each pass's tensors and calls the backbone (the reference);
    static      the passes below, executed eagerly on their static buffers: exactly what a
                graph replays, and it runs on a CPU, so tests prove the buffer bookkeeping;
    cuda_graph  the same passes captured once per bucket (torch.cuda.CUDAGraph) and replayed.
                On a CPU device it runs as `static`.

Passes, one per slot-count bucket b (buckets default 1, 8, 32, 64, capped at S and S added):

    prefill   rows [b] slot ids; embeds [b, P+T, H]; mask [b, 1, P+T, P+T]; writes the rows'
              cache positions [0, P+T); returns block-0 hidden [b, T, H] and logits [b, T, D*V]
    verify    rows [b]; embeds [b, K*T, H]; mask [b, 1, K*T, Lalloc]; positions P+T .. P+(K+1)T-1
              (every verified row is at block 1); returns logits [b, K*T, D*V]
    step      slots [0, b); inputs are the slot table's own state: num_done [b], active [b],
              tokens [b, T, D, L], key_mask [b, Lalloc]; the block inputs, positions (= write
              positions) and mask are computed inside the pass, so a step costs the host four
              small copies and one replay; returns logits [b, T, D*V]
    parallel  no cache; embeds [b, P+L*T, H]; mask [b, 1, P+L*T, P+L*T]; returns logits [b, L*T, D*V]

Subset passes (prefill, verify, parallel) pad their rows up to the bucket: padded rows point at
the cache's scratch slot (index S, never used by a chunk) and get zero inputs (finite: a NaN in
a masked slot would leak, KV_CACHE.md pitfall 3). The step pass takes the smallest bucket that
covers the highest stepping slot; slots above it in the bucket are idle (no valid positions).

Capture happens at the start of a run, before any slot holds a chunk: the warm-up executions
write K/V from whatever the buffers hold, which is harmless only then. Attention runs under
SDPA's memory-efficient or math backend on CUDA, in both paths (cuDNN's failed to capture a
24-position step here, and flash attention cannot take an additive mask).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from rsd_ray.decoding.row_cache import window_inputs

GRAPH_MODES = ("eager", "static", "cuda_graph")
DEFAULT_BUCKETS = (1, 8, 32, 64)
PASS_KINDS = ("prefill", "verify", "step", "parallel")


def bucket_sizes(num_slots: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets below S, then S itself: every slot count 1..S has a bucket."""
    if num_slots < 1:
        raise ValueError(f"num_slots={num_slots}; expected >= 1")
    if any(b < 1 for b in buckets):
        raise ValueError(f"graph buckets {buckets}; expected positive slot counts")
    return tuple(sorted({b for b in buckets if b < num_slots} | {num_slots}))


def bucket_for(count: int, sizes: tuple[int, ...]) -> int:
    """Smallest bucket >= count (sizes ascending)."""
    for size in sizes:
        if size >= count:
            return size
    raise ValueError(f"{count} rows do not fit the largest bucket {sizes[-1]}; expected <= {sizes[-1]}")


def effective_graph_mode(requested: str, device: torch.device) -> str:
    """cuda_graph needs a CUDA device; elsewhere the same passes run eagerly (`static`)."""
    if requested not in GRAPH_MODES:
        raise ValueError(f"graph_mode={requested!r}; expected one of {', '.join(GRAPH_MODES)}")
    if requested == "cuda_graph" and device.type != "cuda":
        warnings.warn(f"graph_mode='cuda_graph' on device {device}: no CUDA graphs there, running the "
                      f"same static passes eagerly ('static')", stacklevel=3)
        return "static"
    return requested


def attention_backends(device: torch.device):
    """SDPA backends that capture and take an additive mask (CUDA); a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class StaticPass:
    """One fixed-shape pass: its input buffers, the function that runs on them, its graph.

    inputs (prefill, verify, parallel): rows [b] long slot ids (not parallel), embeds [b, W, H],
    position_ids [b, W] long (also the cache write positions), mask [b, 1, W, Lk] additive.
    inputs (step): num_done [b] long, active [b] bool, tokens [b, T, D, L] long,
    key_mask [b, Lalloc] bool, position_ids [b, T] long (written by the pass itself).
    """

    kind: str
    bucket: int
    inputs: dict[str, torch.Tensor]
    fn: Callable[[], tuple[torch.Tensor, ...]]
    graph: "torch.cuda.CUDAGraph | None" = None
    outputs: tuple[torch.Tensor, ...] = ()   # the captured outputs (graph mode)

    def run(self) -> tuple[torch.Tensor, ...]:
        """Runs on what the buffers hold now. A replay's outputs are copied out: the next
        replay of this graph overwrites them."""
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


class StaticPasses:
    """The static buffers and passes of one engine shape (prefix length P, cache length Lalloc).

    model: RSDModel; cache: RowOffsetCache with num_slots + 1 slots (the last is scratch) or
    None (parallel passes only); num_slots: S, the slots the engine decodes with.
    """

    def __init__(self, model, cache, num_slots: int, prefix_length: int, max_len: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, use_graphs: bool = False):
        if cache is not None and cache.num_slots != num_slots + 1:
            raise ValueError(f"cache has {cache.num_slots} slots; expected S + 1 = {num_slots + 1} "
                             f"(the last one is the scratch slot)")
        c = model.config
        self.model, self.cache = model, cache
        self.num_slots, self.P, self.max_len = num_slots, prefix_length, max_len
        self.T, self.L, self.H = c.chunk_steps, c.num_rfsq_layers, c.hidden_size
        self.sizes = bucket_sizes(num_slots, buckets)
        self.use_graphs = use_graphs
        self.scratch = num_slots
        self.passes: dict[tuple, StaticPass] = {}
        self._pool = None
        if use_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"use_graphs=True on device {self.device}; CUDA graphs need a CUDA device")
            self._pool = torch.cuda.graph_pool_handle()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- building -----------------------------------------------------------------------
    def _new_step(self, bucket: int) -> StaticPass:
        dev, dt = self.device, self.dtype
        c = self.model.config
        model, cache, P, T, L, max_len = self.model, self.cache, self.P, self.T, self.L, self.max_len
        inputs = {"num_done": torch.zeros(bucket, dtype=torch.long, device=dev),
                  "active": torch.zeros(bucket, dtype=torch.bool, device=dev),
                  "tokens": torch.zeros(bucket, T, c.latent_dim, L, dtype=torch.long, device=dev),
                  "key_mask": torch.ones(bucket, max_len, dtype=torch.bool, device=dev),
                  "position_ids": P + torch.arange(T, device=dev)[None].repeat(bucket, 1)}
        m, tokens, position_ids = inputs["num_done"], inputs["tokens"], inputs["position_ids"]

        def fn():
            # the same ops as the engine's eager step (modes.py), on static buffers
            num_valid = torch.where(inputs["active"], T, 0)
            last = (m - 1).clamp(min=0)[:, None, None, None].expand(bucket, T, c.latent_dim, 1)
            prev = tokens.gather(3, last)                                              # [b, T, D, 1]
            x = model.block_inputs(prev, m.clamp(max=L - 1)[:, None]).to(dt)          # [b, T, H]
            pos, mask = window_inputs(P + m * T, num_valid, T, max_len, dt, inputs["key_mask"])
            position_ids.copy_(pos)                  # in place: the cache reads its write positions here
            cache.bind(None, position_ids, prefill=False)
            return (model.head(model.run_backbone(x, position_ids, mask, cache)),)
        return StaticPass("step", bucket, inputs, fn)

    def _new_pass(self, kind: str, bucket: int, width: int, key_len: int, first_pos: int,
                  subset: bool) -> StaticPass:
        if kind == "step":
            return self._new_step(bucket)
        dev, dt = self.device, self.dtype
        rows = torch.full((bucket,), self.scratch, dtype=torch.long, device=dev) if subset else None
        embeds = torch.zeros(bucket, width, self.H, dtype=dt, device=dev)
        position_ids = (first_pos + torch.arange(width, device=dev))[None].repeat(bucket, 1)
        mask = torch.zeros(bucket, 1, width, key_len, dtype=dt, device=dev)
        inputs = {"embeds": embeds, "position_ids": position_ids, "mask": mask}
        if rows is not None:
            inputs["rows"] = rows
        model, cache, P = self.model, self.cache, self.P

        if kind == "prefill":
            def fn():
                cache.bind(rows, None, prefill=True)
                hidden = model.run_backbone(embeds, position_ids, mask, cache)
                h0 = hidden[:, P:]                                        # [b, T, H]
                return h0, model.head(h0)
        elif kind == "verify":
            def fn():
                cache.bind(rows, position_ids, prefill=False)
                return (model.head(model.run_backbone(embeds, position_ids, mask, cache)),)
        elif kind == "parallel":
            def fn():
                hidden = model.run_backbone(embeds, position_ids, mask, None)
                return (model.head(hidden[:, P:]),)
        else:
            raise ValueError(f"pass kind={kind!r}; expected one of {', '.join(PASS_KINDS)}")
        return StaticPass(kind, bucket, inputs, fn)

    def _shape(self, kind: str, num_draft_layers: int) -> tuple[int, int, int]:
        """(width W, key length, first position) of a pass kind."""
        P, T, L = self.P, self.T, self.L
        if kind == "prefill":
            return P + T, P + T, 0
        if kind == "verify":
            return num_draft_layers * T, self.max_len, P + T
        if kind == "step":
            return T, self.max_len, P
        return P + L * T, P + L * T, 0

    def get(self, kind: str, bucket: int, num_draft_layers: int = 0) -> StaticPass:
        key = (kind, bucket, num_draft_layers if kind == "verify" else 0)
        if key not in self.passes:
            if kind != "parallel" and self.cache is None:
                raise ValueError(f"a {kind} pass needs the row-offset cache; these passes were built without one")
            width, key_len, first = self._shape(kind, num_draft_layers)
            self.passes[key] = self._new_pass(kind, bucket, width, key_len, first, subset=kind in ("prefill", "verify"))
        p = self.passes[key]
        if self.use_graphs and p.graph is None:
            self._capture(p)
        return p

    def prepare(self, kinds: tuple[str, ...], num_draft_layers: int = 0) -> None:
        """Build (and in graph mode capture) every bucket of these kinds, largest bucket first
        so the smaller graphs reuse its memory pool. Call only while no slot holds a chunk."""
        for bucket in sorted(self.sizes, reverse=True):
            for kind in kinds:
                if kind == "verify" and num_draft_layers < 2:
                    continue          # K = 1: nothing is ever verified
                self.get(kind, bucket, num_draft_layers)

    def _capture(self, p: StaticPass) -> None:
        with attention_backends(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):         # lazy initialisations (cuBLAS handles, workspaces) outside capture
                    p.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the policy actor runs predict in a worker thread beside its event loop
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = p.fn()
        p.graph, p.outputs = graph, outputs

    # ---- running ------------------------------------------------------------------------
    def _fill_subset(self, p: StaticPass, rows: torch.Tensor | None, embeds: torch.Tensor,
                     mask: torch.Tensor) -> None:
        n = embeds.shape[0]
        buf = p.inputs
        buf["embeds"][:n].copy_(embeds)
        buf["embeds"][n:].zero_()
        buf["mask"][:n].copy_(mask)
        buf["mask"][n:].zero_()
        if rows is not None:
            buf["rows"][:n].copy_(rows)
            buf["rows"][n:].fill_(self.scratch)

    def prefill(self, rows: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [n] slot ids; embeds [n, P+T, H]; mask [n, 1, P+T, P+T].
        Returns block-0 hidden [n, T, H] and logits [n, T, D*V]."""
        n = len(rows)
        p = self.get("prefill", bucket_for(n, self.sizes))
        self._fill_subset(p, rows, embeds, mask)
        h0, logits = p.run()
        return h0[:n], logits[:n]

    def verify(self, rows: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
               num_draft_layers: int) -> torch.Tensor:
        """rows [n] slot ids, all at block 1; embeds [n, K*T, H]; mask [n, 1, K*T, Lalloc].
        Returns logits [n, K*T, D*V]."""
        n = len(rows)
        p = self.get("verify", bucket_for(n, self.sizes), num_draft_layers)
        self._fill_subset(p, rows, embeds, mask)
        return p.run()[0][:n]

    def step(self, num_done: torch.Tensor, active: torch.Tensor, tokens: torch.Tensor,
             key_mask: torch.Tensor) -> torch.Tensor:
        """Slots [0, b), b a bucket size: num_done [b] long in [0, L] (RFSQ layers final, so the
        window starts at P + num_done*T); active [b] bool (False: idle, no valid positions);
        tokens [b, T, D, L] long (the layer before each block is read from it);
        key_mask [b, Lalloc] bool. Returns logits [b, T, D*V]."""
        b = num_done.shape[0]
        if b not in self.sizes:
            raise ValueError(f"step pass over {b} slots; expected a bucket size, one of {self.sizes}")
        p = self.get("step", b)
        buf = p.inputs
        buf["num_done"].copy_(num_done)
        buf["active"].copy_(active)
        buf["tokens"].copy_(tokens)
        buf["key_mask"].copy_(key_mask)
        return p.run()[0]

    def parallel(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds [n, P+L*T, H]; mask [n, 1, P+L*T, P+L*T]. Returns logits [n, L*T, D*V]."""
        n = embeds.shape[0]
        p = self.get("parallel", bucket_for(n, self.sizes))
        self._fill_subset(p, None, embeds, mask)
        return p.run()[0][:n]
