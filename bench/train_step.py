"""Training-step cost of the default policy model: one teacher-forced forward + backward + AdamW
step at batch 32, with the instruction as 64 byte positions (instruction_pool_tokens=0, v2-v5)
and pooled into 2 positions (instruction_pool_tokens=2, v7p), on CPU threads.

    python bench/train_step.py
    python bench/train_step.py --num_threads=1 --out=bench/results/train_step_cpu1.json

Inputs are random tensors of the training job's shapes (jobs/train_policy.py default_model, conv
stem 32 as shipped): the cost does not depend on their values. Prints a table of median seconds
per step and writes JSON with every timed step.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from bench.common import format_table, write_json  # noqa: E402
from rsd_ray.policy.modeling_rsd import RSDModel  # noqa: E402
from rsd_ray.policy.training import teacher_forced_logits, token_losses  # noqa: E402
from train_policy import default_model  # noqa: E402


@dataclass
class TrainStepBenchConfig:
    batch_size: int = 32
    pool_tokens: list[int] = field(default_factory=lambda: [0, 2])
    conv_stem_channels: int = 32
    warmup: int = 3
    repeats: int = 15
    num_threads: int = 2
    out: str = "bench/results/train_step_cpu.json"


def time_steps(pool: int, cfg: TrainStepBenchConfig) -> list[float]:
    torch.manual_seed(0)
    config = replace(default_model(), instruction_pool_tokens=pool, conv_stem_channels=cfg.conv_stem_channels)
    model = RSDModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, c = cfg.batch_size, config
    images = torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size) * 2 - 1
    ids = torch.randint(0, 256, (B, c.max_instruction_tokens))
    mask = torch.ones(B, c.max_instruction_tokens, dtype=torch.bool)
    proprio = torch.randn(B, c.state_dim)
    tokens = torch.randint(0, c.num_levels, (B, c.chunk_steps, c.latent_dim, c.num_rfsq_layers))
    seconds = []
    for i in range(cfg.warmup + cfg.repeats):
        start = time.perf_counter()
        logits, _ = teacher_forced_logits(model, images, ids, mask, proprio, tokens)
        ce, _ = token_losses(logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        ce.sum().backward()
        optimizer.step()
        if i >= cfg.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def main(cfg: TrainStepBenchConfig) -> None:
    torch.set_num_threads(cfg.num_threads)
    rows, steps = [], {}
    for pool in cfg.pool_tokens:
        seconds = time_steps(pool, cfg)
        steps[pool] = seconds
        rows.append({"instruction_pool_tokens": pool, "median_s": statistics.median(seconds),
                     "min_s": min(seconds), "max_s": max(seconds)})
    base = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_first"] = row["median_s"] / base
    print(format_table(rows, ["instruction_pool_tokens", "median_s", "min_s", "max_s", "ratio_to_first"]))
    path = write_json(cfg.out, {"config": asdict(cfg), "rows": rows, "seconds": steps})
    print(f"wrote {path}")


if __name__ == "__main__":
    import draccus
    main(draccus.parse(TrainStepBenchConfig))
