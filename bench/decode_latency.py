"""Per-chunk latency and chunks/s of the three decoding modes, speculative at controlled acceptance.

One call = `DecodeEngine.run` on B observations with B slots (what one PolicyActor batch costs;
every chunk of the call is ready when it returns, so per-chunk latency = call time). The
speculative draft is `OracleDraft`: the real draft network runs (its cost is real), then each
proposed RFSQ layer is replaced by the main model's own greedy answer with probability `a`
(otherwise one token is wrong and `exact` rejects it), so speedup is measured as a curve over
acceptance instead of one lucky number. Prefix encoding (vision) and RFSQ decoding are not
timed here: they are the same for every mode.

    python bench/decode_latency.py                                   # CPU, tiny config
    python bench/decode_latency.py --shape llama2_7b --device cuda   # GPU, Llama-2-7B shape, random weights
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel, OracleDraft
from rsd_ray.policy.modeling_rsd import RSDModel, torch_dtype


@dataclass
class BenchConfig:
    shape: str = "tiny"                        # tiny | llama2_7b
    device: str = "cpu"
    dtype: str = ""                            # "" -> float32 (tiny) / bfloat16 (7B)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    accept_rates: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
    draft_layers: tuple[int, ...] = (3, 7)
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    queue_factor: int = 4                      # queue rows: queue_factor * B chunks through B slots
    queue_repeats: int = 3
    out: str = "bench/results/decode_latency_cpu.json"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


def versions() -> dict[str, str]:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def build(cfg: BenchConfig) -> tuple[RSDModel, DraftModel]:
    config = RSDConfig.tiny() if cfg.shape == "tiny" else RSDConfig.llama2_7b_shape()
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


def summarize(label: dict, batch: int, samples: list[float], results: list) -> dict:
    def mean_counter(name: str) -> float:
        return statistics.mean(float(r.counters[name].mean()) for r in results)
    median = statistics.median(samples)
    return {**label, "batch": batch, "median_ms": median, "p90_ms": float(np.percentile(samples, 90)),
            "chunks_per_s": batch / (median / 1e3), "main_passes_per_chunk": mean_counter("num_main_passes"),
            "accepted_layers": mean_counter("num_accepted_layers"), "draft_ms": mean_counter("draft_ms"),
            "verify_ms": mean_counter("verify_ms"), "step_ms": mean_counter("step_ms"), "samples_ms": samples}


def time_round_robin(cfg: BenchConfig, engines: list, embeds, mask, repeats: int) -> tuple[list, list]:
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


def run_queue(cfg: BenchConfig, model, draft, batch: int) -> list[dict]:
    """Throughput with a queue: queue_factor*B chunks through B slots. A slot freed by a chunk
    that accepted many layers takes the next chunk at once, so speculation pays per chunk,
    not per batch's slowest chunk."""
    n = cfg.queue_factor * batch
    embeds, mask = prefixes(model, n, cfg.seed + 1000 + batch)
    answers = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch)).run(
        embeds, mask).tokens
    engines = [({"mode": "autoregressive", "K": 0, "accept_rate": None},
                DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch)))]
    for K in cfg.draft_layers:
        for a in cfg.accept_rates:
            if a == 0.0:
                continue
            engines.append(({"mode": "speculative", "K": K, "accept_rate": a},
                            DecodeEngine(model, OracleDraft(draft, answers, copy_prob=a, seed=cfg.seed),
                                         DecodeSettings(mode="speculative", draft_layers=K, num_slots=batch))))
    samples, results = time_round_robin(cfg, engines, embeds, mask, cfg.queue_repeats)
    rows = []
    for i, (label, _) in enumerate(engines):
        row = summarize({**label, "num_chunks": n}, batch, samples[i], results[i])
        row["chunks_per_s"] = n / (row["median_ms"] / 1e3)
        rows.append(row)
    for r in rows:
        r["speedup_vs_ar"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


def run(cfg: BenchConfig) -> list[dict]:
    """One call of B chunks with B slots, per batch size and mode (timed round-robin)."""
    torch.set_num_threads(cfg.threads)
    model, draft = build(cfg)
    rows = []
    for batch in cfg.batch_sizes:
        embeds, mask = prefixes(model, batch, cfg.seed + batch)
        engines: list[tuple[dict, DecodeEngine]] = []
        for mode in ("parallel", "autoregressive"):
            engines.append(({"mode": mode, "K": 0, "accept_rate": None},
                            DecodeEngine(model, None, DecodeSettings(mode=mode, num_slots=batch))))
        answers = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch)).run(
            embeds, mask).tokens
        for K in cfg.draft_layers:
            for a in cfg.accept_rates:
                oracle = OracleDraft(draft, answers, copy_prob=a, seed=cfg.seed)
                engines.append(({"mode": "speculative", "K": K, "accept_rate": a},
                                DecodeEngine(model, oracle, DecodeSettings(mode="speculative", draft_layers=K,
                                                                           num_slots=batch))))
        samples, results = time_round_robin(cfg, engines, embeds, mask, cfg.repeats)
        batch_rows = [summarize(label, batch, samples[i], results[i]) for i, (label, _) in enumerate(engines)]
        ar_ms = next(r["median_ms"] for r in batch_rows if r["mode"] == "autoregressive")
        for r in batch_rows:
            r["speedup_vs_ar"] = ar_ms / r["median_ms"]
        rows.extend(batch_rows)
        print(f"batch {batch} done", flush=True)
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "llama2_7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queue-factor", type=int, default=4, help="0 or 1: skip the queue rows")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={args.device} but torch sees no CUDA device; run with --device cpu")
    if args.shape == "llama2_7b" and not args.device.startswith("cuda"):
        raise SystemExit("--shape llama2_7b needs --device cuda (a 7B backbone on a CPU would take hours)")
    out = args.out or f"bench/results/decode_latency_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    cfg = BenchConfig(shape=args.shape, device=args.device, dtype=args.dtype, batch_sizes=tuple(args.batch_sizes),
                      repeats=args.repeats, threads=args.threads, queue_factor=args.queue_factor, out=out)
    rows = run(cfg)
    columns = ["mode", "K", "accept_rate", "batch", "median_ms", "p90_ms", "chunks_per_s",
               "main_passes_per_chunk", "accepted_layers", "speedup_vs_ar"]
    print("one call of B chunks, B slots (per-chunk latency = call time):")
    print(format_table(rows, columns))
    queue_rows = []
    if cfg.queue_factor > 1:
        model, draft = build(cfg)
        for batch in cfg.batch_sizes:
            if batch > 1:
                queue_rows.extend(run_queue(cfg, model, draft, batch))
        print(f"\nqueue: {cfg.queue_factor}*B chunks through B slots (continuous refill), time for all:")
        print(format_table(queue_rows, ["mode", "K", "accept_rate", "batch", "num_chunks", "median_ms",
                                        "chunks_per_s", "main_passes_per_chunk", "accepted_layers", "speedup_vs_ar"]))
    result = {"device": device_name(cfg.device), "versions": versions(), "config": asdict(cfg),
              "model_config": (RSDConfig.tiny() if cfg.shape == "tiny" else RSDConfig.llama2_7b_shape()).to_dict(),
              "rows": rows, "queue_rows": queue_rows}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
