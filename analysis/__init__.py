"""Analysis of rsd_ray runs with pandas: load run directories, success tables with Wilson
intervals, latency and acceptance statistics, speedup and paired comparison against a baseline.

Imports numpy, pandas, pyarrow and rsd_ray.records.schema only (no torch, ray or LIBERO), so a
notebook opens without a simulator. Figures live in `analysis.plots` (matplotlib), the report
command in `analysis.report`.
"""
from analysis.compare import PairedComparison, Speedup, mcnemar_exact_p, paired_comparison, speedup
from analysis.runs import (
    EmptyRunError,
    MixedProtocolError,
    RecordsError,
    Run,
    check_same_protocol,
    chunks_frame,
    decode_label,
    episodes_frame,
    load_run,
    load_runs,
    merge_runs,
    resolve_run_dirs,
)
from analysis.stats import (
    acceptance_by_layer,
    acceptance_stats,
    latency_breakdown,
    latency_stats,
    run_summary,
    success_table,
    wilson_interval,
)

__all__ = [
    "EmptyRunError", "MixedProtocolError", "PairedComparison", "RecordsError", "Run", "Speedup",
    "acceptance_by_layer", "acceptance_stats", "check_same_protocol", "chunks_frame", "decode_label",
    "episodes_frame", "latency_breakdown", "latency_stats", "load_run", "load_runs", "mcnemar_exact_p",
    "merge_runs", "paired_comparison", "resolve_run_dirs", "run_summary", "speedup", "success_table",
    "wilson_interval",
]
