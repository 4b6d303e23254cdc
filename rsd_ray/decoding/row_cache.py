"""A static KV cache where every row of the batch writes at its own offset.

transformers' DynamicCache / StaticCache write one sequence position for the whole batch; the
decoding engine needs slot r to run a window of W positions starting at its own offset
o_r = P + m_r*T (m_r = RFSQ layers already final for that slot). Three pieces make that work
with an unmodified transformers Llama-family decoder (see shared/notes/KV_CACHE.md):

- `RowOffsetCache` (a `Cache`): `update()` scatters the new K/V at per-row slots and returns
  the full static K/V, so buffers keep their addresses (CUDA-graph friendly);
- per-row `position_ids [B, W] = o_r + j`, so RoPE is right for every row;
- an additive 4D float mask `[B, 1, W, Lalloc]` (0 = attend, dtype-min = blocked), which the
  model passes through unchanged. A bool mask would be silently wrong under eager attention.

Two dynamic paths serve a subset of slots, outside any captured graph: `begin_prefill` writes
positions [0, q) of the chosen rows and attends only to the new keys; `begin_rows` runs a
per-row-offset window (the speculative verification) for the chosen rows only.

Buffers are zero-initialised: NaN in a masked slot would still leak (0 x NaN).
The engine allocates one slot more than it decodes with (index S, the *scratch slot*): the
fixed-shape subset passes of graphs.py pad their rows with it, so padding never touches a slot
that holds a chunk.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class RowOffsetLayer(CacheLayerMixin):
    """One decoder layer's static K/V, keys/values [S, Hkv, Lalloc, hd]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "RowOffsetCache", num_slots: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.owner, self.max_len = owner, max_len
        self.keys = torch.zeros(num_slots, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True
        if not torch.compiler.is_compiling():   # fixed addresses, as StaticLayer does
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated eagerly in __init__

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [b, Hkv, q, hd], RoPE already applied by the attention module
        rows = self.owner.rows
        if rows is not None and self.owner.prefill:
            # prefill of rows `rows` at positions [0, q): the keys attended are exactly the new ones
            q = key_states.shape[2]
            self.keys[rows, :, :q] = key_states
            self.values[rows, :, :q] = value_states
            return key_states, value_states
        if rows is not None:
            # a window pass over a subset of slots: [b, W] positions, keys gathered for those rows
            pos = self.owner.write_pos                                   # [b, W]
            self.keys[rows[:, None], :, pos] = key_states.transpose(1, 2)    # indexed view is [b, W, Hkv, hd]
            self.values[rows[:, None], :, pos] = value_states.transpose(1, 2)
            return self.keys[rows], self.values[rows]                    # [b, Hkv, Lalloc, hd]
        b, h, q, hd = key_states.shape
        # the first b slots (b = S unless a run has fewer chunks than slots): views, same storage
        keys, values = self.keys[:b], self.values[:b]
        idx = self.owner.write_pos[:, None, :, None].expand(b, h, q, hd)  # [b, Hkv, W, hd]
        keys.scatter_(2, idx, key_states)            # in place: static address kept
        values.scatter_(2, idx, value_states)
        return keys, values                          # [b, Hkv, Lalloc, hd]; the mask picks valid slots

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("RowOffsetCache needs explicit position_ids and a 4D attention_mask")

    def get_max_length(self) -> int:
        return self.max_len


class RowOffsetCache(Cache):
    """Static per-row-offset cache for S slots of `max_len` positions each.

    Before every forward call either `begin_prefill(rows)` or `begin_window(write_pos)`.
    """

    def __init__(self, backbone_config, num_slots: int, max_len: int, window: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        head_dim = getattr(backbone_config, "head_dim", None) or (
            backbone_config.hidden_size // backbone_config.num_attention_heads)
        kv_heads = getattr(backbone_config, "num_key_value_heads", None) or backbone_config.num_attention_heads
        layers = [RowOffsetLayer(self, num_slots, kv_heads, head_dim, max_len, dtype, device)
                  for _ in range(backbone_config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.num_slots, self.max_len, self.window = num_slots, max_len, window
        self.dtype = dtype
        # write_pos: [S, W] long, the cache slot (= position id) of every query of a window pass.
        # One static buffer per window width so a captured graph keeps reading the same address.
        self._pos_buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.write_pos = self._buffer(num_slots, window, device)
        self.rows: torch.Tensor | None = None      # [b] slots of a subset pass; None = all S
        self.prefill = False

    def _buffer(self, rows: int, width: int, device) -> torch.Tensor:
        if (rows, width) not in self._pos_buffers:
            self._pos_buffers[rows, width] = torch.zeros(rows, width, dtype=torch.long, device=device)
        return self._pos_buffers[rows, width]

    def begin_prefill(self, rows: torch.Tensor) -> None:
        """rows: [b] long slot indices; the next forward writes their positions [0, q)."""
        self.rows, self.prefill = rows, True

    def begin_rows(self, rows: torch.Tensor, write_pos: torch.Tensor) -> None:
        """A window pass over the slots `rows` [b] only (dynamic batch, not for graph capture):
        write_pos [b, W] long; attention sees the rows' whole cache (mask [b, 1, W, Lalloc])."""
        if int(write_pos.max()) >= self.max_len:
            raise ValueError(f"write position {int(write_pos.max())} is beyond the cache length {self.max_len}")
        self.rows, self.prefill, self.write_pos = rows, False, write_pos

    def begin_window(self, write_pos: torch.Tensor) -> None:
        """write_pos: [S', W] long, S' <= S: the window pass covers slots [0, S'); copied in
        place into the static buffer of that shape."""
        if write_pos.shape[0] > self.num_slots:
            raise ValueError(f"write_pos has {write_pos.shape[0]} rows; the cache has S={self.num_slots} slots")
        if int(write_pos.max()) >= self.max_len:
            raise ValueError(f"write position {int(write_pos.max())} is beyond the cache length {self.max_len}")
        buf = self._buffer(write_pos.shape[0], write_pos.shape[1], write_pos.device)
        buf.copy_(write_pos)
        self.write_pos = buf
        self.rows, self.prefill = None, False

    def bind(self, rows: torch.Tensor | None, write_pos: torch.Tensor | None, prefill: bool) -> None:
        """Point the next forward at caller-owned static buffers, without the range checks
        (they read the device: not allowed while a CUDA graph is captured). graphs.py checks
        its positions once, when it fills the buffers.
        rows: [b] long slot ids or None (slots [0, b)); write_pos: [b, W] long or None (prefill)."""
        self.rows, self.prefill = rows, prefill
        if write_pos is not None:
            self.write_pos = write_pos

    def reset(self) -> None:
        for layer in self.layers:
            layer.keys.zero_()
            layer.values.zero_()


def window_inputs(offsets: torch.Tensor, num_valid: torch.Tensor, width: int, max_len: int,
                  dtype: torch.dtype, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row position ids and additive mask for a window pass.

    offsets: [S] long, first position of each row's window; num_valid: [S] long in [0, width].
    key_mask: [S, max_len] bool, False for keys no query may see (padded instruction tokens).
    Returns position_ids [S, W] long and mask [S, 1, W, max_len] of `dtype`.
    Query j of row r sees key k iff k <= o_r + j (causal) and k < o_r + n_r (written by this
    row's valid inputs; padded queries must not read this pass's pad writes or stale slots).
    """
    j = torch.arange(width, device=offsets.device)
    k = torch.arange(max_len, device=offsets.device)
    pos = offsets[:, None] + j[None, :]                                    # [S, W]
    ok = (k[None, None, :] <= pos[:, :, None]) & (k[None, None, :] < (offsets + num_valid)[:, None, None])
    if key_mask is not None:
        ok = ok & key_mask[:, None, :]
    # a fully blocked query row (idle slot) would give NaN under softmax: let it see key 0
    ok[:, :, 0] = True
    mask = torch.zeros(ok.shape, dtype=dtype, device=offsets.device)
    mask = mask.masked_fill(~ok, torch.finfo(dtype).min)[:, None]          # [S, 1, W, Lalloc]
    return pos, mask


def prefill_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """key_mask: [b, q] bool (False = padded token). Returns a causal additive mask [b, 1, q, q]."""
    q = key_mask.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=key_mask.device).tril()
    ok = causal[None] & key_mask[:, None, :]
    ok[:, :, 0] = True
    mask = torch.zeros(ok.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill(~ok, torch.finfo(dtype).min)[:, None]
