"""Write synthetic run directories (manifest.json + episodes/ + chunks/ Parquet) for the analysis
tests, with the real record schemas. Outcomes and latencies are either given explicitly or drawn
from a seeded generator, so every test knows the numbers it should get back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsd_ray.records.schema import CHUNK_SCHEMA, CHUNKS_DIR, EPISODE_SCHEMA, EPISODES_DIR, MANIFEST_FILE

TASK_NAMES = {
    0: "pick up the black bowl between the plate and the ramekin and place it on the plate",
    1: "pick up the black bowl next to the ramekin and place it on the plate",
    2: "pick up the black bowl from table center and place it on the plate",
    3: "pick up the black bowl on the cookie box and place it on the plate",
}


@dataclass
class SyntheticRun:
    """What to write. `outcomes` maps episode_key -> outcome and overrides `success_prob`;
    `accepted_probs[l]` is the chance the draft's layer l is accepted given layers < l were."""

    run_id: str
    mode: str = "speculative"                 # parallel / autoregressive / speculative
    acceptance: str = "exact"
    draft_layers: int = 3
    suite: str = "libero_spatial"
    num_tasks: int = 3
    num_trials: int = 4
    first_trial: int = 0                      # trials first_trial .. first_trial + num_trials - 1
    success_prob: float = 0.7
    latency_ms: float = 40.0                  # median policy latency per chunk
    num_chunks: int = 6
    accepted_probs: tuple[float, ...] = (0.9, 0.7, 0.5)
    protocol_hash: str = "proto-aaaa"
    seed: int = 0
    outcomes: Mapping[str, str] = field(default_factory=dict)
    latency_jitter: float = 0.1               # sigma of the log-normal noise per chunk
    latency_by_key: Mapping[str, float] = field(default_factory=dict)  # overrides latency_ms
    accepted_pattern: tuple[int, ...] | None = None  # accepted layers per chunk, every episode
    write_chunks: bool = True
    write_manifest: bool = True


def episode_keys(spec: SyntheticRun) -> list[str]:
    return [f"{spec.suite}/{t}/{i}" for t in range(spec.num_tasks)
            for i in range(spec.first_trial, spec.first_trial + spec.num_trials)]


def write_run(root: Path, spec: SyntheticRun) -> Path:
    """Write `spec` under root/spec.run_id and return the run directory."""
    run_dir = Path(root) / spec.run_id
    (run_dir / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    speculative = spec.mode == "speculative"
    k = spec.draft_layers if speculative else None
    start = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
    episodes, chunks = [], []
    for n, key in enumerate(episode_keys(spec)):
        suite, task, trial = key.split("/")
        outcome = spec.outcomes.get(key) or ("success" if rng.random() < spec.success_prob else "timeout")
        base_ms = spec.latency_by_key.get(key, spec.latency_ms)
        lat = base_ms * np.exp(rng.normal(0.0, spec.latency_jitter, spec.num_chunks))
        accepted = np.full(spec.num_chunks, -1)
        if speculative and spec.accepted_pattern is not None:
            accepted = np.resize(np.asarray(spec.accepted_pattern), spec.num_chunks)
        elif speculative:
            draws = rng.random((spec.num_chunks, spec.draft_layers)) < np.asarray(spec.accepted_probs[:spec.draft_layers])
            accepted = np.cumprod(draws, axis=1).sum(axis=1)  # accepted prefix length
        for c in range(spec.num_chunks):
            chunks.append({
                "run_id": spec.run_id, "episode_key": key, "suite": suite, "task_id": int(task),
                "trial": int(trial), "attempt": 1, "chunk_index": c, "step": 8 * c, "num_actions_executed": 8,
                "round_trip_ms": float(lat[c] + 3.0), "policy_ms": float(lat[c]),
                "draft_ms": float(0.1 * lat[c]) if speculative else None,
                "verify_ms": float(0.3 * lat[c]) if speculative else None,
                "step_ms": float(0.5 * lat[c]), "decode_ms": 0.5,
                "num_accepted_layers": int(accepted[c]), "num_main_passes": 4, "batch_size": 4,
                "decoding_mode": spec.mode, "acceptance": spec.acceptance if speculative else None,
            })
        episodes.append({
            "run_id": spec.run_id, "episode_key": key, "suite": suite, "task_id": int(task),
            "task_name": TASK_NAMES.get(int(task), f"task {task}"), "instruction": TASK_NAMES.get(int(task), ""),
            "trial": int(trial), "init_state_index": int(trial), "seed": 7, "outcome": outcome,
            "success": outcome == "success", "num_steps": 8 * spec.num_chunks, "num_chunks": spec.num_chunks,
            "wall_s": 10.0, "env_s": 8.0, "reset_s": 1.0, "policy_wait_s": 1.0,
            "latency_ms_mean": float(lat.mean()), "latency_ms_median": float(np.median(lat)),
            "latency_ms_p90": float(np.percentile(lat, 90)), "latency_ms_max": float(lat.max()),
            "round_trip_ms_median": float(np.median(lat) + 3.0), "batch_size_mean": 4.0,
            "accepted_layers_mean": float(accepted.mean()) if speculative else None,
            "main_passes_mean": 4.0, "policy_name": "tiny", "decoding_mode": spec.mode,
            "acceptance": spec.acceptance if speculative else None, "draft_layers": k,
            "lossless": not spec.acceptance.startswith("threshold:") if speculative else True,
            "checkpoint_hash": "ckpt-0", "config_hash": spec.protocol_hash, "attempt": 1,
            "error": "Traceback: EnvCrash" if outcome == "error" else "", "worker": "host:1",
            "finished_at": start + timedelta(seconds=10 * n),
        })
    # Two part files, as an append-only writer would leave them.
    half = len(episodes) // 2
    for i, rows in enumerate((episodes[:half], episodes[half:])):
        pq.write_table(pa.Table.from_pylist(rows, schema=EPISODE_SCHEMA), run_dir / EPISODES_DIR / f"part-{i:05d}.parquet")
    if spec.write_chunks:
        (run_dir / CHUNKS_DIR).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(chunks, schema=CHUNK_SCHEMA), run_dir / CHUNKS_DIR / "part-00000.parquet")
    if spec.write_manifest:
        manifest = {
            "run_id": spec.run_id,
            "config": {"env": {"suites": [spec.suite], "num_trials": spec.num_trials, "max_steps": None},
                       "policy": {"kind": "tiny", "checkpoint": None},
                       "decode": {"mode": spec.mode, "draft_layers": spec.draft_layers, "acceptance": spec.acceptance}},
            "protocol_hash": spec.protocol_hash,
            "versions": {"numpy": np.__version__, "pyarrow": pa.__version__},
            "host": {"hostname": "test"},
            "created_at": start.isoformat(),
        }
        (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return run_dir


def write_sweep(root: Path, seed: int = 0) -> list[Path]:
    """The customer's test matrix, small: an autoregressive baseline, parallel, and speculative
    runs at tau 0.5 / 0.7 / 0.9 (K=3) plus exact acceptance at K=2 and K=3."""
    common = dict(num_tasks=3, num_trials=6, seed=seed)
    specs = [
        SyntheticRun("ar", mode="autoregressive", latency_ms=70.0, success_prob=0.85, **common),
        SyntheticRun("parallel", mode="parallel", latency_ms=25.0, success_prob=0.6, **common),
        SyntheticRun("spec-tau0.5", acceptance="threshold:0.5", latency_ms=38.0, success_prob=0.7,
                     accepted_probs=(0.95, 0.85, 0.7), **common),
        SyntheticRun("spec-tau0.7", acceptance="threshold:0.7", latency_ms=44.0, success_prob=0.8,
                     accepted_probs=(0.9, 0.7, 0.5), **common),
        SyntheticRun("spec-tau0.9", acceptance="threshold:0.9", latency_ms=52.0, success_prob=0.85,
                     accepted_probs=(0.8, 0.5, 0.3), **common),
        SyntheticRun("spec-exact-k2", acceptance="exact", draft_layers=2, latency_ms=55.0, success_prob=0.85,
                     accepted_probs=(0.7, 0.5), **common),
        SyntheticRun("spec-exact-k3", acceptance="exact", draft_layers=3, latency_ms=53.0, success_prob=0.85,
                     accepted_probs=(0.7, 0.5, 0.3), **common),
    ]
    # Distinct seeds: independent latency noise and outcomes per run, as in real runs.
    for i, spec in enumerate(specs):
        spec.seed = seed * 100 + i
    return [write_run(root, s) for s in specs]
