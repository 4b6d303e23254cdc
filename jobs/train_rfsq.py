"""Train an RFSQ action tokenizer and write its checkpoint directory plus reconstruction metrics.

    python jobs/train_rfsq.py --synthetic=20000 --out_dir=checkpoints/rfsq_synthetic
    python jobs/train_rfsq.py --npy=chunks.npy --out_dir=runs/rfsq
    python jobs/train_rfsq.py --parquet=demos/ --column=action_chunk --out_dir=runs/rfsq
    python jobs/train_rfsq.py --synthetic=4000 --rfsq.hidden_dim=64 --steps=500 ...

Exactly one source: a Parquet file or dataset directory whose `column` holds one chunk per row
(T*A floats, or T lists of A), a .npy of shape [N, T, A] or [N, T*A], or N synthetic chunks
(rsd_ray.decoding.synthetic_actions). A seeded fraction of the chunks is held out; the metrics
JSON reports, for every l in 1..L, MSE and max abs error on it in normalised and raw units.

Training loss: the mean over l = 1..L of log(MSE of decoding from the first l rfsq_layers).
The log weighs every layer's relative improvement equally; a plain mean would be dominated by
the coarse layers (errors ~1e-2) and leave the full-depth error (~1e-5) untrained.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd_ray.decoding.rfsq import RFSQConfig, RFSQTokenizer, reconstruction_metrics
from rsd_ray.decoding.synthetic_actions import synthetic_chunks


@dataclass
class TrainRFSQConfig:
    out_dir: str = "checkpoints/rfsq_synthetic"   # checkpoint directory written by save_pretrained
    metrics_file: str = "train_metrics.json"       # written inside out_dir (not part of the checkpoint hash)
    # Data: exactly one of parquet / npy / synthetic.
    parquet: str | None = None     # Parquet file or dataset directory
    column: str = "action_chunk"   # Parquet column with one chunk per row
    npy: str | None = None         # .npy [N, T, A] or [N, T*A]
    synthetic: int = 0             # > 0: train on this many synthetic chunks
    seed: int = 0                  # data split, synthetic data, init and batch order
    val_fraction: float = 0.1      # held out for the metrics
    # Optimisation.
    steps: int = 3000
    batch_size: int = 256          # chunks per step
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    device: str = "auto"           # auto / cpu / cuda / cuda:1 ...
    num_threads: int = 1           # torch CPU threads (the dev box is shared)
    progress: bool = True          # tqdm bar
    rfsq: RFSQConfig = field(default_factory=RFSQConfig)

    def __post_init__(self) -> None:
        sources = {"parquet": self.parquet, "npy": self.npy, "synthetic": self.synthetic or None}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"train_rfsq: data sources given: {given or 'none'}; expected exactly one of "
                             f"--parquet, --npy, --synthetic=N")
        if self.synthetic < 0:
            raise ValueError(f"train_rfsq: synthetic={self.synthetic}; expected a chunk count >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"train_rfsq: val_fraction={self.val_fraction}; expected a value in (0, 1)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"train_rfsq: steps={self.steps}, batch_size={self.batch_size}; expected both >= 1")


def load_chunks(config: TrainRFSQConfig) -> np.ndarray:
    """The configured source -> [N, T, A] float32 raw actions."""
    t, a = config.rfsq.chunk_steps, config.rfsq.action_dim
    if config.synthetic:
        return synthetic_chunks(config.synthetic, seed=config.seed, chunk_steps=t)
    if config.npy is not None:
        chunks = np.load(config.npy)
        source = config.npy
    else:
        chunks = _read_parquet_column(config.parquet, config.column)
        source = f"{config.parquet} column {config.column!r}"
    if chunks.ndim == 2 and chunks.shape[1] == t * a:
        chunks = chunks.reshape(-1, t, a)
    if chunks.ndim != 3 or chunks.shape[1:] != (t, a) or chunks.shape[0] == 0:
        raise ValueError(f"{source}: chunks of shape {list(chunks.shape)}; expected [N, T, A] = [N, {t}, {a}] "
                         f"or [N, T*A] = [N, {t * a}] with N > 0")
    if not np.all(np.isfinite(chunks)):
        raise ValueError(f"{source}: contains non-finite actions")
    return chunks.astype(np.float32)


def _read_parquet_column(path: str, column: str) -> np.ndarray:
    """One chunk per row (a list of T*A floats, or T lists of A) -> [N, T*A] or [N, T, A]."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema_names = pq.read_schema(path).names if Path(path).is_file() else pq.ParquetDataset(path).schema.names
    if column not in schema_names:
        raise ValueError(f"{path}: no column {column!r}; columns are {', '.join(schema_names)} (use --column)")
    values = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    num_rows = len(values)
    if values.null_count:
        raise ValueError(f"{path}: column {column!r} has {values.null_count} null rows")
    inner_lengths = []
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"{path}: column {column!r} has rows of different lengths "
                             f"({lengths.min()}..{lengths.max()}); expected one chunk per row")
        inner_lengths.append(int(lengths[0]) if len(lengths) else 0)
        values = pc.list_flatten(values)
    if not inner_lengths:
        raise ValueError(f"{path}: column {column!r} has type {values.type}; expected a list of floats per row")
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(num_rows, *inner_lengths)


def _lr_at(step: int, config: TrainRFSQConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    return {name: version(name) for name in ("torch", "numpy", "safetensors")}


def train_rfsq(config: TrainRFSQConfig, chunks: np.ndarray | None = None,
               command: str | None = None) -> dict[str, Any]:
    """Train, save the checkpoint to config.out_dir, write the metrics JSON, return the metrics.

    chunks: optional [N, T, A] raw actions that replace the configured source.
    command: the command line to record in the metrics JSON (main passes its own).
    """
    from tqdm import tqdm

    torch.set_num_threads(config.num_threads)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else "cpu" if config.device == "auto" else config.device)
    chunks = load_chunks(config) if chunks is None else np.asarray(chunks, dtype=np.float32)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(chunks))
    num_val = max(1, int(round(config.val_fraction * len(chunks))))
    if len(chunks) - num_val < 1:
        raise ValueError(f"train_rfsq: {len(chunks)} chunks leave none for training after holding out {num_val}")
    val_chunks, train_chunks = chunks[order[:num_val]], chunks[order[num_val:]]

    torch.manual_seed(config.seed)
    tok = RFSQTokenizer(config.rfsq)
    tok.normalizer.fit(train_chunks)
    tok.to(device).train()
    train_norm = tok.normalizer.normalize(torch.as_tensor(train_chunks, device=device))   # [N, T, A]
    optimizer = torch.optim.AdamW(tok.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train_rfsq", disable=not config.progress, mininterval=1.0)
    losses = torch.zeros(config.rfsq.num_layers)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        index = torch.randint(len(train_norm), (config.batch_size,), generator=generator).to(device)
        losses = tok.reconstruction_losses(train_norm[index])                 # [L]
        loss = torch.log(losses + 1e-12).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.steps - 1:
            bar.set_postfix(mse_l1=f"{losses[0].item():.2e}", mse_full=f"{losses[-1].item():.2e}")
    train_s = time.perf_counter() - start

    tok.eval()
    per_layer = reconstruction_metrics(tok, val_chunks)
    out_dir = tok.save_pretrained(config.out_dir)
    metrics = {
        "checkpoint": str(out_dir),
        "fingerprint": tok.fingerprint(),
        "num_train_chunks": int(len(train_chunks)),
        "num_val_chunks": int(num_val),
        "train_s": round(train_s, 2),
        "device": str(device),
        "final_train_mse_per_layer": [float(v) for v in losses.detach().cpu()],
        "val": per_layer,
        "versions": _versions(),
        "config": asdict(config),
        "command": command,
    }
    (out_dir / config.metrics_file).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import draccus

    config = draccus.parse(TrainRFSQConfig, args=argv)
    args = sys.argv[1:] if argv is None else argv
    metrics = train_rfsq(config, command=" ".join(["python jobs/train_rfsq.py", *args]))
    print(f"{'l':>2} {'mse_norm':>10} {'max_abs_norm':>12} {'mse_raw':>10} {'max_abs_raw':>11}")
    for row in metrics["val"]:
        print(f"{row['num_layers']:>2} {row['mse_norm']:>10.3e} {row['max_abs_norm']:>12.3e} "
              f"{row['mse_raw']:>10.3e} {row['max_abs_raw']:>11.3e}")
    print(f"wrote {metrics['checkpoint']} ({metrics['fingerprint']})")
    return metrics


if __name__ == "__main__":
    main()
