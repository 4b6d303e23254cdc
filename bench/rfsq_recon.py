"""RFSQ tokenizer benchmark: reconstruction error for every l in 1..L on held-out synthetic chunks,
and encode / decode throughput at batch 1 and 1024 on CPU (and CUDA when available).

    OMP_NUM_THREADS=1 python bench/rfsq_recon.py
    python bench/rfsq_recon.py --checkpoint=runs/rfsq --num_threads=8 --out=bench/results/rfsq_recon_cpu8.json

Held-out chunks come from synthetic_chunks with a seed the training job does not use (it uses
seed 0). Errors: normalised units are against the clipped normalised input; raw units against
the raw input, so clipping at the training q01/q99 counts as error. Throughput: chunks/s =
batch / median seconds per call, after warm-up calls, with CUDA synchronised around each call.
decode is timed at full depth (l = L).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rsd_ray.decoding.rfsq import RFSQTokenizer, checkpoint_fingerprint, reconstruction_metrics
from rsd_ray.decoding.synthetic_actions import synthetic_chunks


@dataclass
class RFSQBenchConfig:
    checkpoint: str = "checkpoints/rfsq_synthetic"
    num_chunks: int = 4096              # held-out chunks for the error table
    seed: int = 12345                   # held-out episodes (training used seed 0)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 1024])
    warmup: int = 5                     # untimed calls per (device, op, batch)
    repeats: int = 30                   # timed calls per (device, op, batch)
    num_threads: int = 1                # torch CPU threads
    devices: list[str] = field(default_factory=lambda: ["cpu", "cuda"])   # cuda skipped if absent
    out: str = "bench/results/rfsq_recon_cpu.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def measure_throughput(tok: RFSQTokenizer, config: RFSQBenchConfig, device: torch.device) -> list[dict[str, Any]]:
    tok = tok.to(device)
    rows = []
    for batch in config.batch_sizes:
        chunks = torch.as_tensor(synthetic_chunks(batch, seed=config.seed + 1), device=device)  # [B, T, A]
        tokens = tok.encode(chunks)                                                            # [B, T, D, L]
        ops = {"encode": lambda: tok.encode(chunks), "decode": lambda: tok.decode(tokens)}
        for op, fn in ops.items():
            samples = _time_calls(fn, device, config.warmup, config.repeats)
            median_s = statistics.median(samples)
            p90_s = sorted(samples)[int(0.9 * (len(samples) - 1))]
            rows.append({"device": str(device), "op": op, "batch": batch, "median_ms": median_s * 1e3,
                         "p90_ms": p90_s * 1e3, "chunks_per_s": batch / median_s,
                         "samples_ms": [s * 1e3 for s in samples]})
    return rows


def device_names(devices: list[torch.device]) -> dict[str, str]:
    names = {"cpu": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"}
    for device in devices:
        if device.type == "cuda":
            names[str(device)] = torch.cuda.get_device_name(device)
    return names


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": version("numpy"), "safetensors": version("safetensors")}


def format_table(rows: list[dict[str, Any]], columns: list[str], float_format: str = ".3e") -> str:
    def cell(value: Any) -> str:
        return format(value, float_format) if isinstance(value, float) else str(value)
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def run(config: RFSQBenchConfig) -> dict[str, Any]:
    torch.set_num_threads(config.num_threads)
    tok = RFSQTokenizer.from_pretrained(config.checkpoint)
    held_out = synthetic_chunks(config.num_chunks, seed=config.seed)
    recon_rows = reconstruction_metrics(tok, held_out)
    # What normalisation alone loses (clipping to the training q01/q99): the floor of the raw errors.
    raw = torch.as_tensor(held_out)
    clip_err = (tok.normalizer.unnormalize(tok.normalizer.normalize(raw)) - raw).double()
    clip_floor = {"mse_raw": float(clip_err.pow(2).mean()), "max_abs_raw": float(clip_err.abs().max())}
    devices = [torch.device(d) for d in config.devices if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    speed_rows = [row for device in devices for row in measure_throughput(tok, config, device)]
    print(f"RFSQ reconstruction, {config.num_chunks} held-out synthetic chunks (seed {config.seed}), "
          f"checkpoint {config.checkpoint}")
    print(format_table(recon_rows, ["num_layers", "mse_norm", "max_abs_norm", "mse_raw", "max_abs_raw"]))
    print(f"raw-unit floor from clipping to q01/q99 alone: mse_raw {clip_floor['mse_raw']:.3e}, "
          f"max_abs_raw {clip_floor['max_abs_raw']:.3e}")
    print("\nthroughput (decode at l = L)")
    print(format_table(speed_rows, ["device", "op", "batch", "median_ms", "p90_ms", "chunks_per_s"],
                       float_format=".3f"))
    out = {"device": device_names(devices), "versions": versions(), "config": asdict(config),
           "checkpoint_fingerprint": checkpoint_fingerprint(config.checkpoint),
           "reconstruction": recon_rows, "clip_floor": clip_floor, "throughput": speed_rows}
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {config.out}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import draccus

    return run(draccus.parse(RFSQBenchConfig, args=argv))


if __name__ == "__main__":
    main()
