"""Compare a run against a baseline on the same episode keys: latency speedup and paired success.

Both comparisons use only episode keys present in both runs (same suite, task and trial, hence
the same init state), and refuse runs recorded under different protocols unless
allow_mixed_protocols=True.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.runs import Run, check_same_protocol

NUM_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0  # fixed so a report is reproducible


@dataclass(frozen=True)
class Speedup:
    """Baseline latency / run latency on matched episodes (> 1: the run is faster).

    Per episode the latency is the mean `metric` over its chunks (the episode row's
    latency_ms_mean when a run has no chunk records). `speedup` is the ratio of the medians of
    those per-episode values; `ci_low`/`ci_high` a percentile bootstrap of it over episodes
    resampled in pairs; `geomean_ratio` the geometric mean of the per-episode ratios."""

    run: str
    baseline: str
    metric: str
    num_matched: int
    num_only_run: int
    num_only_baseline: int
    run_median_ms: float
    baseline_median_ms: float
    speedup: float
    ci_low: float
    ci_high: float
    geomean_ratio: float
    per_episode: pd.DataFrame  # episode_key, suite, task_id, trial, run_ms, baseline_ms, ratio

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "run": self.run, "baseline": self.baseline, "metric": self.metric,
            "num_matched": self.num_matched, "num_only_run": self.num_only_run,
            "num_only_baseline": self.num_only_baseline, "run_median_ms": self.run_median_ms,
            "baseline_median_ms": self.baseline_median_ms, "speedup": self.speedup,
            "ci_low": self.ci_low, "ci_high": self.ci_high, "geomean_ratio": self.geomean_ratio,
        }])


@dataclass(frozen=True)
class PairedComparison:
    """Success on matched keys. 'gained': failed in the baseline, succeeded in the run; 'lost':
    the reverse. A timeout and an error are both failures. `mcnemar_p` is the exact two-sided
    McNemar test on the flipped episodes (binomial, p=0.5)."""

    run: str
    baseline: str
    num_matched: int
    num_only_run: int
    num_only_baseline: int
    both_success: int
    both_failure: int
    gained: int
    lost: int
    run_success_rate: float
    baseline_success_rate: float
    mcnemar_p: float
    outcomes: pd.DataFrame  # crosstab: baseline outcome (rows) x run outcome (columns)
    flipped: pd.DataFrame   # episode_key, suite, task_id, trial, baseline_outcome, run_outcome, change

    @property
    def difference(self) -> float:
        return self.run_success_rate - self.baseline_success_rate

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "run": self.run, "baseline": self.baseline, "num_matched": self.num_matched,
            "num_only_run": self.num_only_run, "num_only_baseline": self.num_only_baseline,
            "both_success": self.both_success, "both_failure": self.both_failure,
            "gained": self.gained, "lost": self.lost, "run_success_rate": self.run_success_rate,
            "baseline_success_rate": self.baseline_success_rate, "difference": self.difference,
            "mcnemar_p": self.mcnemar_p,
        }])


def speedup(run: Run, baseline: Run, metric: str = "policy_ms",
            allow_mixed_protocols: bool = False) -> Speedup:
    check_same_protocol([run, baseline], allow_mixed_protocols)
    run_ms = _episode_latency(run, metric)
    base_ms = _episode_latency(baseline, metric)
    matched = run_ms.to_frame("run_ms").join(base_ms.to_frame("baseline_ms"), how="inner").dropna()
    only_run = len(set(run_ms.index) - set(base_ms.index))
    only_base = len(set(base_ms.index) - set(run_ms.index))
    if matched.empty:
        raise ValueError(
            f"no episode key of run {run.label!r} ({len(run_ms)} with latency) matches one of baseline "
            f"{baseline.label!r} ({len(base_ms)} with latency); expected runs over the same "
            f"suites, tasks and trials, e.g. {sorted(run_ms.index)[:2]} vs {sorted(base_ms.index)[:2]}")
    matched["ratio"] = matched["baseline_ms"] / matched["run_ms"]
    r = matched["run_ms"].to_numpy()
    b = matched["baseline_ms"].to_numpy()
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(r), size=(NUM_BOOTSTRAP, len(r)))
    boot = np.median(b[idx], axis=1) / np.median(r[idx], axis=1)
    per_episode = matched.reset_index().merge(
        run.episodes[["episode_key", "suite", "task_id", "trial"]], on="episode_key", how="left")
    return Speedup(
        run=run.label, baseline=baseline.label, metric=metric, num_matched=len(matched),
        num_only_run=only_run, num_only_baseline=only_base,
        run_median_ms=float(np.median(r)), baseline_median_ms=float(np.median(b)),
        speedup=float(np.median(b) / np.median(r)),
        ci_low=float(np.percentile(boot, 2.5)), ci_high=float(np.percentile(boot, 97.5)),
        geomean_ratio=float(np.exp(np.mean(np.log(b / r)))),
        per_episode=per_episode[["episode_key", "suite", "task_id", "trial", "run_ms", "baseline_ms", "ratio"]],
    )


def paired_comparison(run: Run, baseline: Run, allow_mixed_protocols: bool = False) -> PairedComparison:
    check_same_protocol([run, baseline], allow_mixed_protocols)
    cols = ["episode_key", "suite", "task_id", "trial", "outcome"]
    pairs = baseline.episodes[cols].merge(run.episodes[["episode_key", "outcome"]], on="episode_key",
                                          how="inner", suffixes=("_baseline", "_run"))
    pairs = pairs.rename(columns={"outcome_baseline": "baseline_outcome", "outcome_run": "run_outcome"})
    run_keys, base_keys = set(run.episodes["episode_key"]), set(baseline.episodes["episode_key"])
    if pairs.empty:
        raise ValueError(
            f"no episode key of run {run.label!r} ({len(run_keys)} episodes) is in baseline "
            f"{baseline.label!r} ({len(base_keys)} episodes); expected runs over the same suites, "
            f"tasks and trials, e.g. {sorted(run_keys)[:2]} vs {sorted(base_keys)[:2]}")
    run_ok = (pairs["run_outcome"] == "success").to_numpy(dtype=bool)
    base_ok = (pairs["baseline_outcome"] == "success").to_numpy(dtype=bool)
    gained, lost = int((run_ok & ~base_ok).sum()), int((~run_ok & base_ok).sum())
    change = np.where(run_ok & ~base_ok, "gained", np.where(~run_ok & base_ok, "lost", ""))
    flipped = pairs.assign(change=change)[change != ""].sort_values(["change", "suite", "task_id", "trial"])
    outcomes = pd.crosstab(pd.Categorical(pairs["baseline_outcome"].astype(str), categories=["success", "timeout", "error"]),
                           pd.Categorical(pairs["run_outcome"].astype(str), categories=["success", "timeout", "error"]),
                           rownames=["baseline"], colnames=["run"], dropna=False)
    return PairedComparison(
        run=run.label, baseline=baseline.label, num_matched=len(pairs),
        num_only_run=len(run_keys - base_keys), num_only_baseline=len(base_keys - run_keys),
        both_success=int((run_ok & base_ok).sum()), both_failure=int((~run_ok & ~base_ok).sum()),
        gained=gained, lost=lost, run_success_rate=float(run_ok.mean()),
        baseline_success_rate=float(base_ok.mean()), mcnemar_p=mcnemar_exact_p(gained, lost),
        outcomes=outcomes, flipped=flipped.reset_index(drop=True),
    )


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | Binomial(gained+lost, 1/2))."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def _episode_latency(run: Run, metric: str) -> pd.Series:
    """Per episode_key mean chunk latency in ms (index episode_key)."""
    chunks = run.chunks
    if len(chunks):
        if metric not in chunks.columns:
            raise ValueError(f"metric={metric!r} is not a chunk column; expected e.g. 'policy_ms' or 'round_trip_ms'")
        values = chunks[chunks[metric].notna()]
        if len(values):
            return values.groupby("episode_key")[metric].mean().astype(float)
    fallback = {"policy_ms": "latency_ms_mean", "round_trip_ms": "round_trip_ms_median"}.get(metric)
    if fallback is None:
        raise ValueError(f"run {run.label!r} has no chunk records with {metric!r}; per-episode fallbacks exist "
                         f"only for 'policy_ms' (latency_ms_mean) and 'round_trip_ms' (round_trip_ms_median)")
    series = run.episodes.set_index("episode_key")[fallback].astype(float)
    return series.dropna()
