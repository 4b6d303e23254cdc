"""Success, latency and acceptance tables from loaded runs (see analysis.runs).

Conventions:
- Success rate = successes / every episode; 'timeout' and 'error' are both failures and each
  has its own count column, so a crash can never hide in the denominator.
- Intervals are Wilson score intervals (95 % unless told otherwise): unlike the normal
  approximation they stay inside [0, 1] and are sensible at 0/n and n/n.
- Latency is per chunk: `policy_ms` (time inside the policy for one chunk) unless told
  otherwise; quantiles are numpy's linear-interpolation percentiles.
- Acceptance: a speculative chunk's `num_accepted_layers` counts the draft's RFSQ layers the
  main model accepted, 0..K (-1 marks a chunk that was not speculative). Full = K accepted,
  none = 0, partial = in between; rfsq_layer l counts as accepted when more than l were.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.runs import Run, _as_list, chunks_frame, episodes_frame

LATENCY_QUANTILES: tuple[tuple[str, float], ...] = (("median_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0))
SUCCESS_LEVELS: dict[str, list[str]] = {
    "task": ["run", "suite", "task_id"],
    "suite": ["run", "suite"],
    "run": ["run"],
}
VARIANT_KEYS: list[str] = ["run", "decode_label", "decoding_mode", "acceptance", "draft_layers"]


def wilson_interval(successes, n, confidence: float = 0.95) -> tuple:
    """Wilson score interval for successes out of n (scalars or arrays). n == 0 gives NaN."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}; expected a value in (0, 1), e.g. 0.95")
    k = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError(f"successes={successes} out of n={n.tolist()}; expected 0 <= successes <= n")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        center = (p + z * z / (2.0 * n)) / denom
        half = z / denom * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
        low = np.where(k == 0, 0.0, np.clip(center - half, 0.0, 1.0))
        high = np.where(k == n, 1.0, np.clip(center + half, 0.0, 1.0))
    low = np.where(n > 0, low, np.nan)
    high = np.where(n > 0, high, np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def success_table(source: Run | Sequence[Run] | pd.DataFrame, level: str = "task",
                  confidence: float = 0.95) -> pd.DataFrame:
    """Success per task, suite or run: counts of each outcome, rate and Wilson interval."""
    if level not in SUCCESS_LEVELS:
        raise ValueError(f"level={level!r}; expected one of {list(SUCCESS_LEVELS)}")
    episodes = _episodes(source)
    keys = SUCCESS_LEVELS[level]
    grouped = episodes.groupby(keys, sort=True, dropna=False)
    table = grouped.agg(
        num_episodes=("outcome", "size"),
        num_success=("outcome", lambda s: int((s == "success").sum())),
        num_timeout=("outcome", lambda s: int((s == "timeout").sum())),
        num_error=("outcome", lambda s: int((s == "error").sum())),
    ).reset_index()
    if level == "task":
        names = grouped["task_name"].agg(lambda s: next((v for v in s.dropna() if v), "")).reset_index()
        table = table.merge(names, on=keys)
        table.insert(3, "task_name", table.pop("task_name"))
    labels = episodes.groupby("run")["decode_label"].agg(lambda s: " / ".join(sorted(set(s.dropna()))))
    table.insert(1, "decode_label", table["run"].map(labels).astype("string"))
    table["success_rate"] = table["num_success"] / table["num_episodes"]
    table["ci_low"], table["ci_high"] = wilson_interval(table["num_success"], table["num_episodes"], confidence)
    return table


def latency_stats(chunks: Run | Sequence[Run] | pd.DataFrame, episodes: pd.DataFrame | None = None,
                  by: Sequence[str] = ("run", "decode_label"), column: str = "policy_ms") -> pd.DataFrame:
    """Per-chunk latency (count, mean, median, p90, p99, max in ms) per group.

    Given Runs, or a chunk frame plus the episode frame, runs without chunk records fall back to
    their per-episode `latency_ms_median` values (source='episode medians'), which summarise
    episodes rather than chunks: a coarser view, labelled so."""
    if isinstance(chunks, (Run, list, tuple)):
        runs = _as_list(chunks)
        chunks, episodes = chunks_frame(runs), episodes_frame(runs)
    by = list(by)
    if column not in chunks.columns:
        raise ValueError(f"column={column!r} is not a chunk column; expected one of "
                         f"{[c for c in chunks.columns if c.endswith('_ms')]}")
    rows = []
    values = chunks[chunks[column].notna()]
    if len(values):
        rows.append(_quantile_table(values, by, column).assign(source="chunks"))
    if episodes is not None:
        covered = set(values["run"].unique()) if len(values) else set()
        rest = episodes[~episodes["run"].isin(covered) & episodes["latency_ms_median"].notna()]
        if len(rest):
            rows.append(_quantile_table(rest, by, "latency_ms_median").assign(source="episode medians"))
    if not rows:
        return pd.DataFrame(columns=by + ["num_chunks", "mean_ms"] + [n for n, _ in LATENCY_QUANTILES]
                            + ["max_ms", "source"])
    return pd.concat(rows, ignore_index=True)


def latency_breakdown(chunks: Run | Sequence[Run] | pd.DataFrame,
                      by: Sequence[str] = ("run", "decode_label")) -> pd.DataFrame:
    """Median of each timed part of a chunk (draft / verify / step / decode / policy / round trip)."""
    if isinstance(chunks, (Run, list, tuple)):
        chunks = chunks_frame(chunks)
    parts = ["draft_ms", "verify_ms", "step_ms", "decode_ms", "policy_ms", "round_trip_ms"]
    table = chunks.groupby(list(by), dropna=False)[parts].median().reset_index()
    return table.rename(columns={p: f"{p[:-3]}_median_ms" for p in parts})


def acceptance_stats(chunks: Run | Sequence[Run] | pd.DataFrame,
                     by: Sequence[str] = tuple(VARIANT_KEYS)) -> pd.DataFrame:
    """Per variant (run, mode, acceptance rule, K): speculative chunks, mean accepted RFSQ layers,
    acceptance rate (accepted / K) and the full / partial / none shares."""
    spec = _speculative_chunks(chunks)
    columns = list(by) + ["num_chunks", "mean_accepted_layers", "acceptance_rate",
                          "share_full", "share_partial", "share_none"]
    if spec.empty:
        return pd.DataFrame(columns=columns)
    accepted = spec["num_accepted_layers"].astype(float)
    k = spec["draft_layers"].astype(float)
    spec = spec.assign(_acc=accepted, _rate=accepted / k,
                       _full=np.where(k.notna(), (accepted >= k).astype(float), np.nan),
                       _none=(accepted == 0).astype(float))
    spec["_partial"] = np.where(k.notna(), 1.0 - spec["_full"] - spec["_none"], np.nan)
    table = spec.groupby(list(by), dropna=False).agg(
        num_chunks=("_acc", "size"), mean_accepted_layers=("_acc", "mean"), acceptance_rate=("_rate", "mean"),
        share_full=("_full", "mean"), share_partial=("_partial", "mean"), share_none=("_none", "mean"),
    ).reset_index()
    return table[columns]


def acceptance_by_layer(chunks: Run | Sequence[Run] | pd.DataFrame,
                        by: Sequence[str] = tuple(VARIANT_KEYS)) -> pd.DataFrame:
    """Long table: for every variant and draft RFSQ layer l < K, the share of speculative
    chunks whose accepted prefix covers layer l (falls with l, since acceptance is a prefix)."""
    spec = _speculative_chunks(chunks)
    columns = list(by) + ["rfsq_layer", "num_chunks", "accepted_share"]
    rows = []
    for key, group in spec.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        k_values = group["draft_layers"].dropna()
        num_layers = int(k_values.max()) if len(k_values) else int(group["num_accepted_layers"].max())
        accepted = group["num_accepted_layers"].to_numpy(dtype=float)
        for layer in range(num_layers):
            rows.append((*key, layer, len(group), float(np.mean(accepted > layer))))
    return pd.DataFrame(rows, columns=columns)


def run_summary(runs: Run | Sequence[Run], confidence: float = 0.95) -> pd.DataFrame:
    """One row per run: decoding variant, success with interval, per-chunk latency, acceptance.
    The table behind the success-vs-latency figure."""
    runs = _as_list(runs)
    success = success_table(runs, level="run", confidence=confidence).set_index("run")
    latency = latency_stats(runs, by=["run"]).set_index("run")
    acceptance = acceptance_stats(runs, by=["run"]).set_index("run")
    rows = []
    for run in runs:
        ep = run.episodes
        s = success.loc[run.label]
        rows.append({
            "run": run.label,
            "decode_label": run.decode_label,
            "decoding_mode": _single(ep["decoding_mode"]),
            "acceptance": _single(ep["acceptance"]),
            "draft_layers": _single(ep["draft_layers"]),
            "lossless": _single(ep["lossless"]),
            "num_episodes": int(s["num_episodes"]),
            "num_success": int(s["num_success"]),
            "num_timeout": int(s["num_timeout"]),
            "num_error": int(s["num_error"]),
            "success_rate": float(s["success_rate"]),
            "ci_low": float(s["ci_low"]),
            "ci_high": float(s["ci_high"]),
            "median_ms": _get(latency, run.label, "median_ms"),
            "p90_ms": _get(latency, run.label, "p90_ms"),
            "p99_ms": _get(latency, run.label, "p99_ms"),
            "latency_source": _get(latency, run.label, "source", default=""),
            "mean_accepted_layers": _get(acceptance, run.label, "mean_accepted_layers",
                                         default=_nanmean(ep["accepted_layers_mean"])),
            "protocol_hash": run.protocol_hash or "",
        })
    table = pd.DataFrame(rows)
    draft = [row["draft_layers"] for row in rows]
    if all(k is None or isinstance(k, (int, np.integer)) for k in draft):
        table["draft_layers"] = pd.array(draft, dtype="Int32")  # <NA>, not float NaN, for non-speculative runs
    return table


# ---------------------------------------------------------------------------------------------

def _episodes(source: Run | Sequence[Run] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    return episodes_frame(source)


def _speculative_chunks(chunks: Run | Sequence[Run] | pd.DataFrame) -> pd.DataFrame:
    if not isinstance(chunks, pd.DataFrame):
        chunks = chunks_frame(chunks)
    accepted = chunks["num_accepted_layers"]
    mask = accepted.notna() & (accepted >= 0)
    if "decoding_mode" in chunks:
        mask &= (chunks["decoding_mode"] == "speculative").fillna(True)
    return chunks[mask.to_numpy(dtype=bool)]


def _quantile_table(df: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    grouped = df.groupby(by, dropna=False)[column]
    table = grouped.agg(num_chunks="size", mean_ms="mean").reset_index()
    for name, q in LATENCY_QUANTILES:
        table[name] = grouped.apply(lambda s, q=q: float(np.percentile(s.to_numpy(dtype=float), q))).to_numpy()
    table["max_ms"] = grouped.max().to_numpy(dtype=float)
    return table


def _single(series: pd.Series):
    values = series.dropna().unique()
    if len(values) == 1:
        value = values[0]
        return value.item() if hasattr(value, "item") else value
    return None if len(values) == 0 else "mixed"


def _get(table: pd.DataFrame, label: str, column: str, default=np.nan):
    if label in table.index and column in table.columns:
        value = table.loc[label, column]
        if isinstance(value, pd.Series):  # several groups for one run: not expected with by=['run']
            value = value.iloc[0]
        return value
    return default


def _nanmean(series: pd.Series) -> float:
    values = series.to_numpy(dtype=float, na_value=np.nan)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else np.nan
