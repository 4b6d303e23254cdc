"""`rsd-report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR] [--out DIR]`: summary tables on stdout,
the four figures as PNG and a Markdown report, by default in the first run's `report/` folder.

RUN_DIR may be a glob or a comma-separated list; with --baseline every run is also compared
with the baseline on matched episode keys (speedup, flipped episodes). A baseline given as
several runs over disjoint trials (a policy evaluated in pieces) is merged into one. Exit
status 2 with a one-line message for a bad run directory, an empty run, runs of different
protocols or baseline pieces that share an episode.
"""
from __future__ import annotations

import argparse
import math
import textwrap
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from analysis.compare import PairedComparison, Speedup, paired_comparison, speedup
from analysis.runs import (MixedProtocolError, RecordsError, Run, check_same_protocol, load_run, load_runs, merge_runs,
                           resolve_run_dirs)
from analysis.stats import acceptance_stats, latency_breakdown, latency_stats, run_summary, success_table

REPORT_DIR = "report"
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
CONSOLE_TEXT_CHARS = 40


@dataclass
class Report:
    """Everything the report shows, as frames, so a notebook can reuse it."""

    runs: list[Run]
    baseline: Run | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    speedups: list[Speedup] = field(default_factory=list)
    paired: list[PairedComparison] = field(default_factory=list)


def build_report(runs: Sequence[Run], baseline: Run | None = None, metric: str = "policy_ms",
                 allow_mixed_protocols: bool = False) -> Report:
    runs = list(runs)
    every = runs + ([baseline] if baseline is not None and baseline.label not in {r.label for r in runs} else [])
    check_same_protocol(every, allow_mixed_protocols)
    report = Report(runs=every, baseline=baseline)
    report.tables["runs"] = run_summary(every)
    report.tables["suites"] = success_table(every, level="suite")
    report.tables["tasks"] = success_table(every, level="task")
    report.tables["latency"] = latency_stats(every, column=metric)
    report.tables["latency breakdown"] = latency_breakdown(every)
    report.tables["acceptance"] = acceptance_stats(every)
    if baseline is not None:
        for run in runs:
            if run.label == baseline.label:
                continue
            report.speedups.append(speedup(run, baseline, metric=metric, allow_mixed_protocols=allow_mixed_protocols))
            report.paired.append(paired_comparison(run, baseline, allow_mixed_protocols=allow_mixed_protocols))
        if report.speedups:
            report.tables["speedup"] = pd.concat([s.summary() for s in report.speedups], ignore_index=True)
            report.tables["paired"] = pd.concat([p.summary() for p in report.paired], ignore_index=True)
            flipped = [p.flipped.assign(run=p.run, baseline=p.baseline) for p in report.paired if len(p.flipped)]
            report.tables["flipped"] = (pd.concat(flipped, ignore_index=True) if flipped else
                                        pd.DataFrame(columns=["episode_key", "baseline_outcome", "run_outcome", "change"]))
    return report


# Columns shown per table (the frames hold more); keeps the console and Markdown readable.
SHOWN: dict[str, list[str]] = {
    "runs": ["run", "decode_label", "num_episodes", "num_success", "num_timeout", "num_error", "success_rate",
             "ci_low", "ci_high", "median_ms", "p90_ms", "p99_ms", "mean_accepted_layers"],
    "suites": ["run", "suite", "num_episodes", "num_success", "num_timeout", "num_error", "success_rate",
               "ci_low", "ci_high"],
    "tasks": ["run", "suite", "task_id", "task_name", "num_episodes", "num_success", "num_timeout", "num_error",
              "success_rate", "ci_low", "ci_high"],
    "latency": ["run", "decode_label", "num_chunks", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms", "source"],
    "latency breakdown": ["run", "draft_median_ms", "verify_median_ms", "step_median_ms", "decode_median_ms",
                          "policy_median_ms", "round_trip_median_ms"],
    "acceptance": ["run", "decode_label", "num_chunks", "mean_accepted_layers", "acceptance_rate", "share_full",
                   "share_partial", "share_none"],
    "speedup": ["run", "baseline", "num_matched", "num_only_run", "num_only_baseline", "run_median_ms",
                "baseline_median_ms", "speedup", "ci_low", "ci_high", "geomean_ratio"],
    "paired": ["run", "baseline", "num_matched", "both_success", "both_failure", "gained", "lost",
               "run_success_rate", "baseline_success_rate", "difference", "mcnemar_p"],
    "flipped": ["run", "baseline", "episode_key", "baseline_outcome", "run_outcome", "change"],
}
TITLES: dict[str, str] = {
    "runs": "Runs (success with 95 % Wilson interval; latency per chunk)",
    "suites": "Success per suite",
    "tasks": "Success per task",
    "latency": "Policy latency per chunk (ms)",
    "latency breakdown": "Latency breakdown per chunk (medians, ms)",
    "acceptance": "Draft acceptance (speculative runs)",
    "speedup": "Speedup against the baseline (matched episodes; > 1 is faster)",
    "paired": "Paired success against the baseline (matched episodes)",
    "flipped": "Episodes that flipped between success and failure",
}


def format_value(value) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def shown(name: str, table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in SHOWN.get(name, list(table.columns)) if c in table.columns]]


def markdown_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "_(none)_"
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(format_value(v).replace("|", "\\|") for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def console_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "(none)"
    formatters = {c: format_value for c in table.columns if table[c].dtype.kind == "f"}
    for c in table.columns:
        if c not in formatters and table[c].dtype.kind in "OU" or str(table[c].dtype) == "string":
            formatters[c] = lambda v: textwrap.shorten(str(v), CONSOLE_TEXT_CHARS, placeholder="...")
    return table.to_string(index=False, formatters=formatters)


def write_markdown(report: Report, figures: dict[str, Path], out_dir: Path) -> Path:
    lines = ["# rsd_ray evaluation report", ""]
    lines += ["| run | run_id | protocol_hash | created_at | directory |", "| --- | --- | --- | --- | --- |"]
    for run in report.runs:
        role = " (baseline)" if report.baseline is not None and run.label == report.baseline.label else ""
        lines.append(f"| {run.label}{role} | {run.run_id} | {run.protocol_hash or 'unknown'} | "
                     f"{run.manifest.get('created_at', '')} | {run.path} |")
    versions = report.runs[0].manifest.get("versions") or {}
    if versions:
        lines += ["", "Versions (first run): " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    notes = [f"- {run.label}: {note}" for run in report.runs for note in run.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    for name, table in report.tables.items():
        lines += ["", f"## {TITLES.get(name, name)}", "", markdown_table(shown(name, table))]
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path.relative_to(out_dir).as_posix()})", ""]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def write_json(report: Report, out_dir: Path) -> Path:
    """Every table as records, beside report.md: the figures a closing note quotes, machine-readable."""
    import json

    doc = {"runs": [{"label": run.label, "run_id": run.run_id, "protocol_hash": run.protocol_hash,
                     "path": str(run.path)} for run in report.runs],
           "baseline": report.baseline.label if report.baseline is not None else None,
           "tables": {name: json.loads(table.to_json(orient="records")) for name, table in report.tables.items()}}
    path = out_dir / REPORT_JSON
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rsd-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directory, glob or comma-separated list (several runs share the figures)")
    parser.add_argument("--baseline", metavar="RUN_DIR",
                        help="run to compare against on matched episode keys; a glob or comma-separated list "
                             "of runs over disjoint trials is merged into one baseline")
    parser.add_argument("--out", metavar="DIR", help=f"output folder (default: FIRST_RUN_DIR/{REPORT_DIR})")
    parser.add_argument("--metric", default="policy_ms", help="chunk latency column (default policy_ms)")
    parser.add_argument("--allow-mixed-protocols", action="store_true",
                        help="compare runs even when their protocol_hash differs")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")  # headless: a report must run on a node without a display
    from analysis.plots import write_figures  # matplotlib only when figures are wanted

    try:
        runs = load_runs(args.run_dirs)
        baseline = None
        if args.baseline:
            baseline_dirs = resolve_run_dirs(args.baseline)
            if len(baseline_dirs) > 1:
                baseline = merge_runs(load_runs(baseline_dirs), allow_mixed_protocols=args.allow_mixed_protocols)
            else:
                baseline = load_run(baseline_dirs[0])
                same = next((r for r in runs if r.path.resolve() == baseline.path.resolve()), None)
                if same is not None:
                    baseline = same
                elif baseline.label in {r.label for r in runs}:
                    baseline = load_run(baseline_dirs[0], label=f"{baseline.label} (baseline)")
        report = build_report(runs, baseline, metric=args.metric, allow_mixed_protocols=args.allow_mixed_protocols)
    except (RecordsError, MixedProtocolError, ValueError) as exc:
        print(f"rsd-report: error: {exc}", file=sys.stderr)
        return 2

    out_dir = Path(args.out) if args.out else runs[0].path / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(report.runs, out_dir)
    markdown = write_markdown(report, figures, out_dir)
    records = write_json(report, out_dir)

    with pd.option_context("display.width", 200, "display.max_colwidth", 40):
        for run in report.runs:
            for note in run.notes:
                print(f"note: {run.label}: {note}")
        for name, table in report.tables.items():
            print(f"\n== {TITLES.get(name, name)} ==")
            print(console_table(shown(name, table)))
    print(f"\nwrote {markdown}")
    print(f"wrote {records}")
    for path in figures.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
