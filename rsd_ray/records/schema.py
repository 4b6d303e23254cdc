"""Parquet schemas of a run's records. Imports pyarrow only, so notebooks can read runs
without a simulator, torch or ray.

A run directory holds:
  manifest.json              full config, package versions, host (records/manifest.py)
  episodes/part-*.parquet    one row per finished episode (EPISODE_SCHEMA), append-only
  chunks/part-*.parquet      optional, one row per action chunk (CHUNK_SCHEMA)
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

EPISODE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("episode_key", pa.string(), nullable=False),      # 'suite/task_id/trial'
    pa.field("suite", pa.string(), nullable=False),
    pa.field("task_id", pa.int32(), nullable=False),
    pa.field("task_name", pa.string()),
    pa.field("instruction", pa.string()),
    pa.field("trial", pa.int32(), nullable=False),
    pa.field("init_state_index", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("outcome", pa.string(), nullable=False),          # success / timeout / error
    pa.field("success", pa.bool_(), nullable=False),            # outcome == 'success', for sums
    pa.field("num_steps", pa.int32()),                          # env steps after the wait steps
    pa.field("num_chunks", pa.int32()),
    pa.field("wall_s", pa.float64()),                           # whole episode on the env actor
    pa.field("env_s", pa.float64()),                            # of which stepping/rendering the env
    pa.field("reset_s", pa.float64()),
    pa.field("policy_wait_s", pa.float64()),                    # of which waiting for chunks
    pa.field("latency_ms_mean", pa.float64()),                  # per-chunk policy latency (in-policy)
    pa.field("latency_ms_median", pa.float64()),
    pa.field("latency_ms_p90", pa.float64()),
    pa.field("latency_ms_max", pa.float64()),
    pa.field("round_trip_ms_median", pa.float64()),             # env -> policy actor -> env
    pa.field("batch_size_mean", pa.float64()),
    pa.field("accepted_layers_mean", pa.float64()),             # NaN when not speculative
    pa.field("main_passes_mean", pa.float64()),
    pa.field("policy_name", pa.string()),
    pa.field("decoding_mode", pa.string()),
    pa.field("acceptance", pa.string()),
    pa.field("draft_layers", pa.int32()),
    pa.field("lossless", pa.bool_()),
    pa.field("checkpoint_hash", pa.string()),
    pa.field("config_hash", pa.string()),                       # hash of the protocol-relevant config
    pa.field("attempt", pa.int32()),                            # 1 = first try
    pa.field("error", pa.string()),                             # traceback / message, '' unless error
    pa.field("worker", pa.string()),                            # host:pid of the env actor
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
])

CHUNK_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("episode_key", pa.string(), nullable=False),
    pa.field("suite", pa.string(), nullable=False),
    pa.field("task_id", pa.int32(), nullable=False),
    pa.field("trial", pa.int32(), nullable=False),
    pa.field("attempt", pa.int32()),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("step", pa.int32()),                               # env step the chunk starts at
    pa.field("num_actions_executed", pa.int32()),
    pa.field("round_trip_ms", pa.float64()),
    pa.field("policy_ms", pa.float64()),
    pa.field("draft_ms", pa.float64()),
    pa.field("verify_ms", pa.float64()),
    pa.field("step_ms", pa.float64()),
    pa.field("decode_ms", pa.float64()),
    pa.field("num_accepted_layers", pa.int32()),                # -1 when not speculative
    pa.field("num_main_passes", pa.int32()),
    pa.field("batch_size", pa.int32()),
    pa.field("decoding_mode", pa.string()),
    pa.field("acceptance", pa.string()),
])

# Training samples: what the policy saw at a chunk boundary and the chunk it answered.
SAMPLE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("episode_key", pa.string(), nullable=False),
    pa.field("suite", pa.string(), nullable=False),
    pa.field("task_id", pa.int32(), nullable=False),
    pa.field("trial", pa.int32(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("step", pa.int32()),
    pa.field("instruction", pa.string()),
    pa.field("agentview_png", pa.binary()),                    # [H, W, 3] uint8 as lossless PNG
    pa.field("wrist_png", pa.binary()),
    pa.field("proprio", pa.list_(pa.float32(), 8)),
    pa.field("action_chunk", pa.list_(pa.float32(), 56)),      # [T=8, A=7] row-major
    pa.field("num_actions_executed", pa.int32()),
    pa.field("episode_success", pa.bool_()),
    # [goal object - grip site, target - grip site] world metres (env.privileged.goal_offsets),
    # when the episode ran with privileged state (expert demonstrations); an auxiliary label.
    # 6 floats or null; a variable-length list because pyarrow reads a null fixed-size list back
    # from Parquet as a zero-length one and then refuses the column.
    pa.field("goal_offsets", pa.list_(pa.float32())),
])
# Nullable columns added after the first release: a part file written before them may lack
# them, and reads as nulls there.
ADDED_SAMPLE_FIELDS = frozenset({"goal_offsets"})

SAMPLES_DIR = "samples"
EPISODES_DIR = "episodes"
CHUNKS_DIR = "chunks"
MANIFEST_FILE = "manifest.json"
