"""Decoding speed against the hardware: weight-read floor, block steps eager vs CUDA graph,
per-chunk latency against the sum of its parts, chunks/s against the FLOP limit.

One run prints five tables and writes them, with the device name, versions and raw samples, to
bench/results/decode_latency_<device>.json:

  floor       reading every backbone weight once (a foreach-norm over all parameters,
              replayed from a CUDA graph on a GPU), median of repeats, measured in this run
  step        one T-position block step over b slots, eager (the static closure run eagerly)
              vs replayed from a CUDA graph, at b = 1, 8, 32, 64, against the floor
  latency     batch 1, one chunk per call: parallel / autoregressive / speculative (K = 3, 7;
              acceptance 0, 0.5, 0.9, 1.0), per graph mode, against the sum of the mode's own
              parts timed alone in this run (prefill + draft + verification + block steps)
  speedup     speculative at full acceptance vs autoregressive: measured ratio over the ratio
              those part timings predict
  throughput  batch 64: chunks/s per mode against the FLOP limit, 2 x parameters x positions
              per chunk / peak dense bf16 FLOP/s (peak looked up from the GPU name: H100 SXM and
              H200 989e12; unknown GPU or CPU: n/a)

The speculative draft is `OracleDraft`: the real draft network runs (its cost is real), then each
proposed RFSQ layer is the main model's own greedy answer with probability a (otherwise one
token is wrong and `exact` rejects it), so speed is a curve over acceptance. Prefix encoding
(vision) and RFSQ decoding are not timed: they are the same for every mode.
Graph modes: eager and cuda_graph on a GPU; eager and static (the graph's closures run eagerly)
on a CPU, where every GPU-only figure is n/a.

    python bench/decode_latency.py --quick                          # CPU smoke run, tiny config (~20 s)
    python bench/decode_latency.py                                  # CPU table, tiny config
    python bench/decode_latency.py --shape llama2_7b --device cuda  # GPU, Llama-2-7B shape, bf16, random weights
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from rsd_ray.decoding.graphs import attention_backends  # noqa: E402
from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings, Workspace  # noqa: E402
from rsd_ray.decoding.row_cache import prefill_mask, window_inputs  # noqa: E402
from rsd_ray.policy.configuration_rsd import RSDConfig  # noqa: E402
from rsd_ray.policy.draft import DraftModel, OracleDraft  # noqa: E402
from rsd_ray.policy.modeling_rsd import RSDModel, torch_dtype  # noqa: E402

# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets; first match wins
PEAK_BF16_FLOPS = (("H200", 989e12, "H200 SXM datasheet, dense bf16 (same tensor cores as H100 SXM)"),
                   ("H100 PCIe", 756e12, "H100 PCIe datasheet, dense bf16"),
                   ("H100 NVL", 835e12, "H100 NVL datasheet, dense bf16"),
                   ("H100", 989e12, "H100 SXM datasheet, dense bf16"),
                   ("A100", 312e12, "A100 datasheet, dense bf16"))


@dataclass
class BenchConfig:
    shape: str = "tiny"                        # tiny | llama2_7b
    device: str = "cpu"
    dtype: str = ""                            # "" -> float32 (tiny) / bfloat16 (7B)
    graph_modes: tuple[str, ...] = ()          # () -> eager + cuda_graph (GPU) / eager + static (CPU)
    step_batches: tuple[int, ...] = (1, 8, 32, 64)
    latency_batch: int = 1
    throughput_batch: int = 64
    accept_rates: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
    throughput_accept_rates: tuple[float, ...] = (0.5, 1.0)
    draft_layers: tuple[int, ...] = (3, 7)
    repeats: int = 5
    throughput_repeats: int = 3
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    queue_factor: int = 0                      # > 1: also queue_factor*B chunks through B slots
    out: str = ""
    quick: bool = False


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


def device_slug(device: str) -> str:
    """'cpu', or the GPU's name in lower case with runs of other characters as '_'."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def peak_flops(device: str) -> tuple[float | None, str]:
    if not device.startswith("cuda"):
        return None, "CPU: no tensor-core peak, FLOP limit n/a"
    name = device_name(device)
    for key, flops, source in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops, source
    return None, f"{name}: peak unknown, FLOP limit n/a"


def versions() -> dict[str, str]:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": str(torch.version.cuda)}


def model_config(cfg: BenchConfig) -> RSDConfig:
    return RSDConfig.tiny() if cfg.shape == "tiny" else RSDConfig.llama2_7b_shape()


def build(cfg: BenchConfig) -> tuple[RSDModel, DraftModel]:
    config = model_config(cfg)
    dtype = torch_dtype(cfg.dtype or ("float32" if cfg.shape == "tiny" else "bfloat16"))
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model, draft = RSDModel(config), DraftModel(config)
    return model.to(dtype).eval(), draft.to(dtype).eval()


@torch.inference_mode()
def prefixes(model: RSDModel, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random observations through the real prefix encoder: [B, P, H], [B, P]."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    dev, dt = model.head.weight.device, model.head.weight.dtype
    images = (torch.rand(batch, c.num_cameras, 3, c.image_size, c.image_size, generator=g) * 2 - 1).to(dev, dt)
    ids = torch.randint(1, 257, (batch, c.max_instruction_tokens), generator=g)
    lengths = torch.randint(8, c.max_instruction_tokens + 1, (batch,), generator=g)
    mask = torch.arange(c.max_instruction_tokens)[None] < lengths[:, None]
    ids = torch.where(mask, ids, 0)
    proprio = (torch.rand(batch, c.proprio_dim, generator=g) * 2 - 1).to(dev, dt)
    return model.encode_prefix(images, ids.to(dev), mask.to(dev), proprio)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, repeats: int, warmup: int = 2) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, a synchronized host clock elsewhere."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def backbone_params(model: RSDModel) -> list[torch.Tensor]:
    """The weights a backbone pass reads (decoder blocks, norms, block head)."""
    return [p for p in model.backbone.parameters()] + [model.head.weight, model.head.bias]


# ---- 1. weight-read floor --------------------------------------------------------------------
@torch.inference_mode()
def measure_floor(cfg: BenchConfig, model: RSDModel) -> dict:
    params = backbone_params(model)
    num_bytes = sum(p.numel() * p.element_size() for p in params)
    read = lambda: torch._foreach_norm(params, 1)           # noqa: E731 - reads every weight once
    how = "foreach L1 norm, eager"
    if cfg.device.startswith("cuda"):
        read()
        torch.cuda.synchronize()
        try:       # one replay instead of ~300 launches: the launch gaps would pad the floor
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                read()
            read, how = graph.replay, "foreach L1 norm, replayed from a CUDA graph"
        except RuntimeError as err:
            how = f"foreach L1 norm, eager (graph capture failed: {err})"
    samples = time_ms(read, cfg.device, max(cfg.repeats, 10) if not cfg.quick else cfg.repeats, warmup=3)
    median = statistics.median(samples)
    return {"floor_ms": median, "weight_bytes": num_bytes, "num_params": sum(p.numel() for p in params),
            "read_gb_per_s": num_bytes / (median / 1e3) / 1e9, "how": how, "samples_ms": samples}


# ---- 2. block step eager vs graph ------------------------------------------------------------
def kv_bytes_per_slot(model: RSDModel, max_len: int) -> int:
    c = model.backbone.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * max_len * head_dim * model.head.weight.element_size()


@torch.inference_mode()
def fill_cache(passes, model: RSDModel, num_rows: int, seed: int) -> None:
    """Prefill slots [0, num_rows) with random prefixes so steps read realistic K/V."""
    embeds, pmask = prefixes(model, num_rows, seed)
    T = model.config.chunk_steps
    x = torch.cat([embeds, model.start_inputs(num_rows).to(embeds.dtype)], dim=1)
    kmask = torch.cat([pmask, torch.ones(num_rows, T, dtype=torch.bool, device=pmask.device)], dim=1)
    largest = passes.sizes[-1]
    for lo in range(0, num_rows, largest):
        hi = min(num_rows, lo + largest)
        passes.prefill(torch.arange(lo, hi, device=x.device), x[lo:hi], prefill_mask(kmask[lo:hi], x.dtype))


@torch.inference_mode()
def measure_steps(cfg: BenchConfig, model: RSDModel, passes_by_mode: dict, floor: dict) -> list[dict]:
    c = model.config
    T = c.chunk_steps
    any_passes = next(iter(passes_by_mode.values()))
    max_len = any_passes.max_len
    fill_cache(any_passes, model, any_passes.num_slots, cfg.seed + 7)
    g = torch.Generator().manual_seed(cfg.seed + 8)
    bandwidth = floor["weight_bytes"] / (floor["floor_ms"] / 1e3)
    rows = []
    for b in cfg.step_batches:
        if b not in any_passes.sizes:
            continue
        num_done = torch.full((b,), 4, dtype=torch.long, device=cfg.device)           # rows mid-chunk (block 4)
        tokens = torch.randint(0, c.num_levels, (b, T, c.latent_dim, c.num_rfsq_layers), generator=g).to(cfg.device)
        active = torch.ones(b, dtype=torch.bool, device=cfg.device)
        key_mask = torch.ones(b, max_len, dtype=torch.bool, device=cfg.device)
        kv = kv_bytes_per_slot(model, max_len) * b
        row = {"batch": b, "floor_ms": floor["floor_ms"],
               "floor_with_kv_ms": (floor["weight_bytes"] + kv) / bandwidth * 1e3, "kv_bytes": kv}
        for mode, passes in passes_by_mode.items():
            p = passes.get("step", b)
            for name, value in (("num_done", num_done), ("tokens", tokens), ("active", active), ("key_mask", key_mask)):
                p.inputs[name].copy_(value)
            with attention_backends(model.head.weight.device):
                samples = time_ms(p.run, cfg.device,       # the pass alone, no input copies
                                  max(cfg.repeats, 10) if not cfg.quick else cfg.repeats)
            label = "graph" if mode == "cuda_graph" else "eager"
            row[f"{label}_ms"] = statistics.median(samples)
            row[f"{label}_samples_ms"] = samples
        row.setdefault("graph_ms", None)
        row["graph_over_floor"] = row["graph_ms"] / row["floor_ms"] if row["graph_ms"] else None
        row["eager_over_floor"] = row["eager_ms"] / row["floor_ms"]
        row["graph_speedup"] = row["eager_ms"] / row["graph_ms"] if row["graph_ms"] else None
        rows.append(row)
    return rows


# ---- 3. parts and per-chunk latency ----------------------------------------------------------
@torch.inference_mode()
def measure_parts(cfg: BenchConfig, model: RSDModel, draft: DraftModel, passes, graph_mode: str,
                  parallel_passes) -> dict:
    """Each pass alone at batch 1 (bucket 1), on the static buffers of `graph_mode`: what a chunk
    would cost if the engine added nothing."""
    c = model.config
    P, T, H = c.prefix_length, c.chunk_steps, c.hidden_size
    dev, dt = model.head.weight.device, model.head.weight.dtype
    embeds, pmask = prefixes(model, 1, cfg.seed + 11)
    x = torch.cat([embeds, model.start_inputs(1).to(dt)], dim=1)
    kmask = torch.cat([pmask, torch.ones(1, T, dtype=torch.bool, device=dev)], dim=1)
    rows = torch.zeros(1, dtype=torch.long, device=dev)
    parts: dict = {}
    repeats = max(cfg.repeats, 5) if not cfg.quick else cfg.repeats
    with attention_backends(dev):
        pmask4 = prefill_mask(kmask, dt)
        parts["prefill_ms"] = statistics.median(time_ms(lambda: passes.prefill(rows, x, pmask4), cfg.device, repeats))
        h0, _ = passes.prefill(rows, x, pmask4)
        offsets = torch.full((1,), P + T, dtype=torch.long, device=dev)
        num_done, active = torch.ones(1, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.bool, device=dev)
        tokens = torch.zeros(1, T, c.latent_dim, c.num_rfsq_layers, dtype=torch.long, device=dev)
        key_mask = torch.ones(1, passes.max_len, dtype=torch.bool, device=dev)
        parts["step_ms"] = statistics.median(time_ms(lambda: passes.step(num_done, active, tokens, key_mask),
                                                     cfg.device, repeats))
        for K in cfg.draft_layers:
            parts[f"draft_ms_K{K}"] = statistics.median(time_ms(lambda: draft.propose(h0, K), cfg.device, repeats))
            if K > 1:
                _, vmask = window_inputs(offsets, torch.full_like(offsets, K * T), K * T, passes.max_len, dt)
                xv = torch.zeros(1, K * T, H, dtype=dt, device=dev)
                parts[f"verify_ms_K{K}"] = statistics.median(time_ms(
                    lambda: passes.verify(rows, xv, vmask, K), cfg.device, repeats))
        xp = torch.cat([embeds, model.parallel_inputs(1).to(dt)], dim=1)
        kp = prefill_mask(torch.cat([pmask, torch.ones(1, c.chunk_length, dtype=torch.bool, device=dev)], dim=1), dt)
        parts["parallel_ms"] = statistics.median(time_ms(lambda: parallel_passes.parallel(xp, kp), cfg.device, repeats))
    parts["graph_mode"] = graph_mode
    return parts


def pass_counts(result, K: int, L: int) -> tuple[float, float, float]:
    """Mean (prefills, verification passes, block steps) per chunk of one engine run."""
    passes = result.counters["num_main_passes"]
    if K == 0:
        return 1.0, 0.0, float((passes - 1).mean())
    verified = (result.counters["num_accepted_layers"] >= 1).double() * float(K > 1)
    return 1.0, float(verified.mean()), float((passes - 1 - verified).mean())


def parts_sum_ms(parts: dict, mode: str, K: int, counts: tuple[float, float, float]) -> float:
    if mode == "parallel":
        return parts["parallel_ms"]
    prefills, verifies, steps = counts
    total = prefills * parts["prefill_ms"] + steps * parts["step_ms"]
    if mode == "speculative":
        total += parts[f"draft_ms_K{K}"] + verifies * parts.get(f"verify_ms_K{K}", 0.0)
    return total


def positions_per_chunk(c: RSDConfig, mode: str, K: int, counts: tuple[float, float, float]) -> float:
    """Backbone positions one chunk runs (idle and padded slots not counted)."""
    P, T, L = c.prefix_length, c.chunk_steps, c.num_rfsq_layers
    if mode == "parallel":
        return P + L * T
    prefills, verifies, steps = counts
    return prefills * (P + T) + verifies * K * T + steps * T


def make_engines(cfg: BenchConfig, model, draft, workspace, graph_mode: str, num_slots: int, answers,
                 accept_rates) -> list[tuple[dict, DecodeEngine]]:
    engines = []
    for mode in ("parallel", "autoregressive"):
        engines.append(({"graph_mode": graph_mode, "mode": mode, "K": 0, "accept_rate": None},
                        DecodeEngine(model, None, DecodeSettings(mode=mode, num_slots=num_slots, graph_mode=graph_mode),
                                     workspace)))
    for K in cfg.draft_layers:
        for a in accept_rates:
            oracle = OracleDraft(draft, answers, copy_prob=a, seed=cfg.seed)
            engines.append(({"graph_mode": graph_mode, "mode": "speculative", "K": K, "accept_rate": a},
                            DecodeEngine(model, oracle, DecodeSettings(mode="speculative", draft_layers=K,
                                                                       num_slots=num_slots, graph_mode=graph_mode),
                                         workspace)))
    return engines


def time_engines(cfg: BenchConfig, engines: list, embeds, mask, repeats: int) -> tuple[list, list]:
    """Warm every engine up, then time repeat r of every engine before repeat r+1 of any, so
    load from other processes hits all modes alike."""
    for _, engine in engines:
        for _ in range(cfg.warmup):
            engine.run(embeds, mask)
    samples: list[list[float]] = [[] for _ in engines]
    results: list[list] = [[] for _ in engines]
    for _ in range(repeats):
        for i, (_, engine) in enumerate(engines):
            sync(cfg.device)
            t0 = time.perf_counter()
            results[i].append(engine.run(embeds, mask))
            sync(cfg.device)
            samples[i].append((time.perf_counter() - t0) * 1e3)
    return samples, results


def summarize(label: dict, batch: int, samples: list[float], results: list, c: RSDConfig) -> dict:
    def mean_counter(name: str) -> float:
        return statistics.mean(float(r.counters[name].mean()) for r in results)
    K = label["K"]
    counts = tuple(statistics.mean(v) for v in zip(*(pass_counts(r, K, c.num_rfsq_layers) for r in results)))
    median = statistics.median(samples)
    return {**label, "batch": batch, "median_ms": median, "p90_ms": float(np.percentile(samples, 90)),
            "chunks_per_s": batch / (median / 1e3), "main_passes_per_chunk": mean_counter("num_main_passes"),
            "accepted_layers": mean_counter("num_accepted_layers"), "pass_counts": list(counts),
            "positions_per_chunk": positions_per_chunk(c, label["mode"], K, counts),
            "draft_ms": mean_counter("draft_ms"), "verify_ms": mean_counter("verify_ms"),
            "step_ms": mean_counter("step_ms"), "samples_ms": samples}


def run_latency(cfg: BenchConfig, model, draft, workspace, parts_by_mode: dict) -> list[dict]:
    c = model.config
    B = cfg.latency_batch
    embeds, mask = prefixes(model, B, cfg.seed + B)
    answers = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=max(cfg.step_batches)),
                           workspace).run(embeds, mask).tokens
    engines = []
    for graph_mode in cfg.graph_modes:
        engines += make_engines(cfg, model, draft, workspace, graph_mode, max(cfg.step_batches), answers,
                                cfg.accept_rates)
    samples, results = time_engines(cfg, engines, embeds, mask, cfg.repeats)
    rows = [summarize(label, B, samples[i], results[i], c) for i, (label, _) in enumerate(engines)]
    for r in rows:
        parts = parts_by_mode[r["graph_mode"]]
        r["parts_sum_ms"] = parts_sum_ms(parts, r["mode"], r["K"], tuple(r["pass_counts"]))
        r["over_parts"] = r["median_ms"] / r["parts_sum_ms"]
        ar = next(x for x in rows if x["graph_mode"] == r["graph_mode"] and x["mode"] == "autoregressive")
        r["speedup_vs_ar"] = ar["median_ms"] / r["median_ms"]
    return rows


def speedup_rows(latency_rows: list[dict]) -> list[dict]:
    """Speculative at full acceptance vs autoregressive: measured over predicted by the parts."""
    out = []
    for r in latency_rows:
        if r["mode"] != "speculative" or r["accept_rate"] != 1.0:
            continue
        ar = next(x for x in latency_rows if x["graph_mode"] == r["graph_mode"] and x["mode"] == "autoregressive")
        measured = ar["median_ms"] / r["median_ms"]
        predicted = ar["parts_sum_ms"] / r["parts_sum_ms"]
        out.append({"graph_mode": r["graph_mode"], "K": r["K"], "spec_ms": r["median_ms"], "ar_ms": ar["median_ms"],
                    "measured_speedup": measured, "predicted_speedup": predicted,
                    "fraction_of_predicted": measured / predicted})
    return out


def run_throughput(cfg: BenchConfig, model, draft, workspace, peak: float | None) -> list[dict]:
    c = model.config
    B = cfg.throughput_batch
    embeds, mask = prefixes(model, B, cfg.seed + 100 + B)
    S = max(cfg.step_batches)
    answers = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=S), workspace).run(
        embeds, mask).tokens
    engines = []
    for graph_mode in cfg.graph_modes:
        engines += make_engines(cfg, model, draft, workspace, graph_mode, S, answers, cfg.throughput_accept_rates)
    samples, results = time_engines(cfg, engines, embeds, mask, cfg.throughput_repeats)
    rows = [summarize(label, B, samples[i], results[i], c) for i, (label, _) in enumerate(engines)]
    num_params = sum(p.numel() for p in backbone_params(model))
    for r in rows:
        flops = 2 * num_params * r["positions_per_chunk"]
        r["achieved_tflops"] = r["chunks_per_s"] * flops / 1e12
        r["flop_limit_chunks_per_s"] = peak / flops if peak else None
        r["fraction_of_flop_limit"] = r["chunks_per_s"] / r["flop_limit_chunks_per_s"] if peak else None
    return rows


def run_queue(cfg: BenchConfig, model, draft, workspace, graph_mode: str, batch: int) -> list[dict]:
    """Throughput with a queue: queue_factor*B chunks through B slots. A slot freed by a chunk
    that accepted many layers takes the next chunk at once, so speculation pays per chunk,
    not per batch's slowest chunk."""
    c = model.config
    n = cfg.queue_factor * batch
    embeds, mask = prefixes(model, n, cfg.seed + 1000 + batch)
    answers = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch), workspace).run(
        embeds, mask).tokens
    engines = [e for e in make_engines(cfg, model, draft, workspace, graph_mode, batch, answers,
                                       [a for a in cfg.accept_rates if a > 0]) if e[0]["mode"] != "parallel"]
    samples, results = time_engines(cfg, engines, embeds, mask, cfg.throughput_repeats)
    rows = []
    for i, (label, _) in enumerate(engines):
        row = summarize({**label, "num_chunks": n}, batch, samples[i], results[i], c)
        row["chunks_per_s"] = n / (row["median_ms"] / 1e3)
        rows.append(row)
    for r in rows:
        r["speedup_vs_ar"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


# ---- report ----------------------------------------------------------------------------------
def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))
    table = [columns] + [[cell(r.get(col)) for col in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def done_when_checks(step_rows, latency_rows, speedups, throughput_rows) -> list[dict]:
    """The issue's acceptance figures, evaluated on this run (GPU figures only on a GPU)."""
    checks = []
    small = [r for r in step_rows if r["batch"] <= 8]
    worst = max((r["graph_over_floor"] for r in small if r["graph_over_floor"]), default=None)
    checks.append({"check": "graph block step at batch <= 8 within 1.3x of the weight-read floor",
                   "value": worst, "target": 1.3, "ok": None if worst is None else worst <= 1.3})
    fast = [r for r in latency_rows if r["graph_mode"] == "cuda_graph"]
    worst = max((r["over_parts"] for r in fast), default=None)
    checks.append({"check": "every mode at batch 1 within 1.1x of the sum of its parts (cuda_graph)",
                   "value": worst, "target": 1.1, "ok": None if worst is None else worst <= 1.1})
    for s in speedups:
        if s["graph_mode"] == "cuda_graph":
            checks.append({"check": f"K={s['K']} full acceptance: speedup vs AR >= 0.9 of the parts' prediction",
                           "value": s["fraction_of_predicted"], "target": 0.9, "ok": s["fraction_of_predicted"] >= 0.9})
    for r in fast:
        if r["mode"] == "speculative" and r["accept_rate"] == 1.0:
            target = 45.0 if r["K"] == 7 else None
            checks.append({"check": f"RSD chunk K={r['K']}, full acceptance, batch 1 (ms)", "value": r["median_ms"],
                           "target": target, "ok": (r["median_ms"] <= 45.0) if target else None})
    for r in throughput_rows:
        if r["graph_mode"] == "cuda_graph" and r["fraction_of_flop_limit"] is not None:
            target = 0.6 if r["mode"] == "parallel" else None
            name = f"{r['mode']}" + (f" K={r['K']} a={r['accept_rate']}" if r["mode"] == "speculative" else "")
            checks.append({"check": f"batch {r['batch']} {name}: fraction of the FLOP limit",
                           "value": r["fraction_of_flop_limit"], "target": target,
                           "ok": (r["fraction_of_flop_limit"] >= 0.6) if target else None})
    return checks


def run(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    model, draft = build(cfg)
    c = model.config
    P = c.prefix_length
    peak, peak_source = peak_flops(cfg.device)
    workspace = Workspace()
    S = max(cfg.step_batches)          # every engine decodes with S slots: one shared cache
    passes_by_mode, parallel_by_mode, parts_by_mode = {}, {}, {}
    for graph_mode in cfg.graph_modes:
        # the eager engine's parts are timed on the static closures run eagerly (the same ops)
        static_mode = "static" if graph_mode == "eager" else graph_mode
        probe = DecodeEngine(model, draft, DecodeSettings(mode="speculative", num_slots=S, graph_mode=static_mode,
                                                          draft_layers=max(cfg.draft_layers)), workspace)
        passes = probe.static_passes(P)
        for K in cfg.draft_layers:          # every K's verification pass, before any slot is live
            with torch.inference_mode(), attention_backends(model.head.weight.device):
                passes.prepare(("verify",), K)
        passes_by_mode[graph_mode] = passes
        parallel_by_mode[graph_mode] = probe.static_passes(P, parallel=True)
    eager_passes = next(p for p in passes_by_mode.values() if not p.use_graphs)
    print(f"device: {device_name(cfg.device)}; model {cfg.shape} ({model.head.weight.dtype}); "
          f"graph modes {', '.join(cfg.graph_modes)}", flush=True)

    floor = measure_floor(cfg, model)
    print(f"\n[floor] read {floor['weight_bytes'] / 1e9:.3g} GB of weights ({floor['num_params'] / 1e6:.4g} M params): "
          f"{floor['floor_ms']:.3g} ms median ({floor['read_gb_per_s']:.0f} GB/s; {floor['how']})", flush=True)

    step_passes = {"eager": eager_passes}
    if "cuda_graph" in cfg.graph_modes:
        step_passes["cuda_graph"] = passes_by_mode["cuda_graph"]
    step_rows = measure_steps(cfg, model, step_passes, floor)
    print("\n[step] one block step (T positions) over b slots at block 4, eager vs CUDA graph:")
    print(format_table(step_rows, ["batch", "floor_ms", "floor_with_kv_ms", "eager_ms", "graph_ms",
                                   "eager_over_floor", "graph_over_floor", "graph_speedup"]), flush=True)

    for graph_mode in cfg.graph_modes:
        parts_by_mode[graph_mode] = measure_parts(cfg, model, draft, passes_by_mode[graph_mode], graph_mode,
                                                  parallel_by_mode[graph_mode])
    print("\n[parts] each pass alone, batch 1 (ms):")
    part_cols = sorted({k for p in parts_by_mode.values() for k in p if "_ms" in k})
    print(format_table([{"graph_mode": m, **p} for m, p in parts_by_mode.items()], ["graph_mode"] + part_cols), flush=True)

    latency_rows = run_latency(cfg, model, draft, workspace, parts_by_mode)
    print(f"\n[latency] batch {cfg.latency_batch}, one chunk per call (per-chunk latency = call time):")
    print(format_table(latency_rows, ["graph_mode", "mode", "K", "accept_rate", "median_ms", "p90_ms",
                                      "parts_sum_ms", "over_parts", "main_passes_per_chunk", "accepted_layers",
                                      "speedup_vs_ar"]), flush=True)
    speedups = speedup_rows(latency_rows)
    print("\n[speedup] speculative at full acceptance vs autoregressive, measured / predicted by the parts:")
    print(format_table(speedups, ["graph_mode", "K", "spec_ms", "ar_ms", "measured_speedup", "predicted_speedup",
                                  "fraction_of_predicted"]), flush=True)

    throughput_rows = run_throughput(cfg, model, draft, workspace, peak)
    print(f"\n[throughput] batch {cfg.throughput_batch}, one call of B chunks; FLOP limit = 2 x "
          f"{sum(p.numel() for p in backbone_params(model)) / 1e6:.4g} M params x positions / peak "
          f"({peak_source}):")
    print(format_table(throughput_rows, ["graph_mode", "mode", "K", "accept_rate", "median_ms", "chunks_per_s",
                                         "positions_per_chunk", "achieved_tflops", "flop_limit_chunks_per_s",
                                         "fraction_of_flop_limit"]), flush=True)

    queue_rows = []
    if cfg.queue_factor > 1:
        fast = cfg.graph_modes[-1]
        for batch in cfg.step_batches:
            if 1 < batch <= cfg.throughput_batch:     # its own cache: B slots, not S
                queue_rows.extend(run_queue(cfg, model, draft, Workspace(), fast, batch))
        print(f"\n[queue] {cfg.queue_factor}*B chunks through B slots (continuous refill), {fast}, time for all:")
        print(format_table(queue_rows, ["mode", "K", "accept_rate", "batch", "num_chunks", "median_ms",
                                        "chunks_per_s", "main_passes_per_chunk", "accepted_layers", "speedup_vs_ar"]))

    checks = done_when_checks(step_rows, latency_rows, speedups, throughput_rows)
    print("\n[done-when] issue 7's targets on this run (n/a: needs a GPU):")
    print(format_table(checks, ["check", "value", "target", "ok"]))
    return {"device": device_name(cfg.device), "versions": versions(), "config": asdict(cfg),
            "model_config": c.to_dict(), "peak_bf16_flops": peak, "peak_source": peak_source, "floor": floor,
            "step_rows": step_rows, "parts": parts_by_mode, "latency_rows": latency_rows, "speedup_rows": speedups,
            "throughput_rows": throughput_rows, "queue_rows": queue_rows, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "llama2_7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--graph-modes", nargs="+", choices=["eager", "static", "cuda_graph"], default=None)
    parser.add_argument("--step-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--throughput-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queue-factor", type=int, default=None, help="> 1: add queue rows (default 4 tiny, 0 7B)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batches 1 and 8, K=3, acceptance 0 and 1, 2 repeats, no queue rows")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device} but torch sees no CUDA device; run with --device cpu")
    if args.shape == "llama2_7b" and not cuda:
        raise SystemExit("--shape llama2_7b needs --device cuda (a 7B backbone on a CPU would take hours)")
    modes = tuple(args.graph_modes or (["eager", "cuda_graph"] if cuda else ["eager", "static"]))
    if "cuda_graph" in modes and not cuda:
        raise SystemExit("--graph-modes cuda_graph needs --device cuda; on a CPU use eager and static")
    cfg = BenchConfig(shape=args.shape, device=args.device, dtype=args.dtype, graph_modes=modes,
                      step_batches=tuple(args.step_batches), throughput_batch=args.throughput_batch,
                      repeats=args.repeats, threads=args.threads, quick=args.quick,
                      queue_factor=args.queue_factor if args.queue_factor is not None else (4 if args.shape == "tiny" else 0))
    if args.quick:
        cfg.step_batches, cfg.throughput_batch, cfg.repeats, cfg.throughput_repeats = (1, 8), 8, 2, 1
        cfg.accept_rates, cfg.throughput_accept_rates, cfg.queue_factor = (0.0, 1.0), (1.0,), 0
        cfg.draft_layers = (3,)
    if cfg.throughput_batch > max(cfg.step_batches):
        raise SystemExit(f"--throughput-batch={cfg.throughput_batch} exceeds the largest step batch "
                         f"{max(cfg.step_batches)}; the engines' slot count is the largest step batch")
    cfg.out = args.out or f"bench/results/decode_latency_{device_slug(cfg.device)}{'_quick' if args.quick else ''}.json"
    result = run(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
