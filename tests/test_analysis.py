"""analysis/: loading, Wilson intervals, latency / acceptance tables, speedup and paired
comparison on constructed records, clear errors for bad input, the report command's PNGs, the
notebook executed headless, and an import that pulls in neither torch nor ray."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import analysis
from analysis import plots
from analysis.report import main as report_main
from rsd_ray.records.schema import CHUNK_SCHEMA, EPISODE_SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_records import SyntheticRun, episode_keys, write_run, write_sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "rsd_eval.ipynb"
FIGURES = ("success_by_task", "latency_over_episodes", "acceptance_by_layer", "success_vs_latency")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_sweep(root)
    return root


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    return analysis.load_runs(str(sweep_dir / "*"))


# ---- Wilson intervals -------------------------------------------------------------------------

def _score_test_bound(k: int, n: int, upper: bool, z: float = 1.959963984540054) -> float:
    """Reference by definition, not by formula: the Wilson bound is the p where the score
    statistic |k/n - p| / sqrt(p (1 - p) / n) equals z; found by bisection."""
    phat = k / n
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    if (upper and k == n) or (not upper and k == 0):
        return float(k == n) if upper else 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(phat - mid) <= z * math.sqrt(mid * (1 - mid) / n)
        if upper:
            lo, hi = (mid, hi) if inside else (lo, mid)
        else:
            lo, hi = (lo, mid) if inside else (mid, hi)
    return (lo + hi) / 2


@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
])
def test_wilson_interval_matches_published_values(k, n, expected):
    low, high = analysis.wilson_interval(k, n)
    assert (round(low, 4), round(high, 4)) == expected
    assert low == pytest.approx(_score_test_bound(k, n, upper=False), abs=1e-9)
    assert high == pytest.approx(_score_test_bound(k, n, upper=True), abs=1e-9)


def test_wilson_interval_vectorised_and_edge_cases():
    low, high = analysis.wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    assert low.shape == (3,) and low[0] == 0.0 and high[2] == 1.0
    assert low[1] < 0.5 < high[1] and (0.5 - low[1]) == pytest.approx(high[1] - 0.5)
    assert all(math.isnan(v) for v in analysis.wilson_interval(0, 0))
    wide = analysis.wilson_interval(8, 10, confidence=0.99)
    assert wide[0] < 0.4902 and wide[1] > 0.9433
    with pytest.raises(ValueError, match="successes"):
        analysis.wilson_interval(11, 10)


# ---- loading ----------------------------------------------------------------------------------

def test_load_runs_typed_columns_labels_and_globs(sweep_dir, sweep):
    assert [r.label for r in sweep] == ["ar", "parallel", "spec-exact-k2", "spec-exact-k3",
                                        "spec-tau0.5", "spec-tau0.7", "spec-tau0.9"]
    ep = analysis.episodes_frame(sweep)
    assert len(ep) == 7 * 18 and ep["run"].nunique() == 7
    assert str(ep["task_id"].dtype) == "int32" and ep["success"].dtype == bool
    assert str(ep["suite"].dtype) == "string" and str(ep["draft_layers"].dtype) == "Int32"
    assert str(ep["finished_at"].dtype).startswith("datetime64[ms")
    ch = analysis.chunks_frame(sweep)
    assert len(ch) == 7 * 18 * 6 and str(ch["num_accepted_layers"].dtype) == "Int32"
    labels = {r.label: r.decode_label for r in sweep}
    assert labels["spec-tau0.7"] == "speculative K=3 tau=0.7" and labels["ar"] == "autoregressive"
    assert labels["spec-exact-k2"] == "speculative K=2 exact"
    # A comma-separated list, with the same directory twice, loads it once.
    two = analysis.load_runs(f"{sweep_dir / 'ar'},{sweep_dir / 'parallel'},{sweep_dir / 'ar'}")
    assert [r.label for r in two] == ["ar", "parallel"]
    assert sweep[0].protocol_hash == "proto-aaaa" and sweep[0].run_id == "ar"


def test_retry_rows_keep_last_attempt(tmp_path):
    run_dir = write_run(tmp_path, SyntheticRun("retry", num_tasks=1, num_trials=3,
                                               outcomes={"libero_spatial/0/1": "error"}))
    rows = pq.read_table(run_dir / "episodes").to_pylist()
    retried = dict(next(r for r in rows if r["episode_key"] == "libero_spatial/0/1"))
    assert retried["outcome"] == "error"
    retried.update(outcome="success", success=True, attempt=2, error="")
    pq.write_table(pa.Table.from_pylist([retried], schema=EPISODE_SCHEMA), run_dir / "episodes" / "part-00009.parquet")
    run = analysis.load_run(run_dir)
    assert len(run.episodes) == 3
    row = run.episodes.set_index("episode_key").loc["libero_spatial/0/1"]
    assert row["outcome"] == "success" and row["attempt"] == 2
    assert any("earlier attempt" in n for n in run.notes)
    # Chunks of the superseded attempt 1 are dropped with the row they belonged to.
    assert set(run.chunks.loc[run.chunks["episode_key"] == "libero_spatial/0/1", "attempt"]) == set()
    assert any("chunk row" in n for n in run.notes)


# ---- tables -----------------------------------------------------------------------------------

def test_success_table_counts_errors_in_denominator(tmp_path):
    outcomes = {"libero_spatial/0/0": "success", "libero_spatial/0/1": "error",
                "libero_spatial/0/2": "timeout", "libero_spatial/0/3": "success",
                "libero_spatial/1/0": "error", "libero_spatial/1/1": "error",
                "libero_spatial/1/2": "success", "libero_spatial/1/3": "success"}
    run = analysis.load_run(write_run(tmp_path, SyntheticRun("errs", num_tasks=2, num_trials=4, outcomes=outcomes)))
    tasks = analysis.success_table(run, level="task").set_index("task_id")
    assert tasks.loc[0, ["num_episodes", "num_success", "num_timeout", "num_error"]].tolist() == [4, 2, 1, 1]
    assert tasks.loc[1, ["num_episodes", "num_success", "num_timeout", "num_error"]].tolist() == [4, 2, 0, 2]
    assert tasks.loc[1, "success_rate"] == 0.5
    total = analysis.success_table(run, level="run").iloc[0]
    assert (total["num_episodes"], total["num_success"], total["num_error"]) == (8, 4, 3)
    assert (total["ci_low"], total["ci_high"]) == pytest.approx(analysis.wilson_interval(4, 8))
    assert tasks.loc[0, "task_name"].startswith("pick up the black bowl")


def test_latency_stats_match_raw_chunk_values(sweep_dir, sweep):
    table = analysis.latency_stats(sweep).set_index("run")
    raw = pq.read_table(sweep_dir / "spec-tau0.7" / "chunks").column("policy_ms").to_numpy()
    row = table.loc["spec-tau0.7"]
    assert row["num_chunks"] == len(raw) == 108 and row["source"] == "chunks"
    for name, q in (("median_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
        assert row[name] == pytest.approx(np.percentile(raw, q))
    assert table.loc["ar", "median_ms"] > table.loc["spec-tau0.5", "median_ms"] > table.loc["parallel", "median_ms"]


def test_latency_falls_back_to_episode_records_without_chunks(tmp_path):
    run = analysis.load_run(write_run(tmp_path, SyntheticRun("nochunks", mode="autoregressive", write_chunks=False)))
    assert run.chunks.empty and "draft_layers" in run.chunks
    row = analysis.latency_stats(run).iloc[0]
    assert row["source"] == "episode medians" and row["num_chunks"] == len(run.episodes)
    assert row["median_ms"] == pytest.approx(np.median(run.episodes["latency_ms_median"]))


def test_acceptance_stats_and_by_layer_on_known_pattern(tmp_path):
    # Per chunk accepted layers 3, 3, 0, 1, 2, 3 of K=3: full 3/6, partial 2/6, none 1/6.
    run = analysis.load_run(write_run(tmp_path, SyntheticRun("acc", acceptance="threshold:0.7", draft_layers=3,
                                                             accepted_pattern=(3, 3, 0, 1, 2, 3))))
    row = analysis.acceptance_stats(run).iloc[0]
    assert row["acceptance"] == "threshold:0.7" and row["draft_layers"] == 3
    assert row["mean_accepted_layers"] == pytest.approx(2.0) and row["acceptance_rate"] == pytest.approx(2 / 3)
    assert (row["share_full"], row["share_partial"], row["share_none"]) == pytest.approx((3 / 6, 2 / 6, 1 / 6))
    by_layer = analysis.acceptance_by_layer(run)
    assert by_layer["rfsq_layer"].tolist() == [0, 1, 2]
    assert by_layer["accepted_share"].tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6])
    ar = analysis.load_run(write_run(tmp_path, SyntheticRun("ar", mode="autoregressive")))
    assert analysis.acceptance_stats(ar).empty and analysis.acceptance_by_layer(ar).empty


# ---- comparisons ------------------------------------------------------------------------------

def test_speedup_on_matched_keys_only(tmp_path):
    base_keys = episode_keys(SyntheticRun("x", num_tasks=2, num_trials=3))
    # The run has two extra trials per task at 1000 ms: they must not enter the comparison.
    run_spec = SyntheticRun("fast", num_tasks=2, num_trials=5, latency_jitter=0.0, latency_ms=1000.0,
                            latency_by_key={k: 40.0 + 10 * i for i, k in enumerate(base_keys)})
    base_spec = SyntheticRun("slow", mode="autoregressive", num_tasks=2, num_trials=3, latency_jitter=0.0,
                             latency_by_key={k: 2 * (40.0 + 10 * i) for i, k in enumerate(base_keys)})
    run = analysis.load_run(write_run(tmp_path, run_spec))
    base = analysis.load_run(write_run(tmp_path, base_spec))
    result = analysis.speedup(run, base)
    assert (result.num_matched, result.num_only_run, result.num_only_baseline) == (6, 4, 0)
    assert result.speedup == pytest.approx(2.0) and result.geomean_ratio == pytest.approx(2.0)
    assert result.ci_low == pytest.approx(2.0) and result.ci_high == pytest.approx(2.0)
    assert result.run_median_ms == pytest.approx(np.median([40, 50, 60, 70, 80, 90]))
    assert set(result.per_episode["episode_key"]) == set(base_keys)
    # Without chunk records the episode rows' latency_ms_mean gives the same answer.
    run_ep = analysis.load_run(write_run(tmp_path / "e", SyntheticRun(**{**run_spec.__dict__, "write_chunks": False})))
    assert analysis.speedup(run_ep, base).speedup == pytest.approx(2.0)
    other = analysis.load_run(write_run(tmp_path, SyntheticRun("other", suite="libero_goal", num_trials=2)))
    with pytest.raises(ValueError, match="no episode key"):
        analysis.speedup(other, base)


def test_paired_comparison_counts_flips(tmp_path):
    keys = ["libero_spatial/0/0", "libero_spatial/0/1", "libero_spatial/0/2", "libero_spatial/0/3"]
    base = analysis.load_run(write_run(tmp_path, SyntheticRun(
        "base", mode="autoregressive", num_tasks=1, num_trials=4,
        outcomes=dict(zip(keys, ["success", "timeout", "error", "success"])))))
    run = analysis.load_run(write_run(tmp_path, SyntheticRun(
        "run", num_tasks=1, num_trials=4, outcomes=dict(zip(keys, ["success", "success", "success", "timeout"])))))
    cmp = analysis.paired_comparison(run, base)
    assert (cmp.num_matched, cmp.both_success, cmp.both_failure, cmp.gained, cmp.lost) == (4, 1, 0, 2, 1)
    assert cmp.run_success_rate == 0.75 and cmp.baseline_success_rate == 0.5 and cmp.difference == 0.25
    assert dict(zip(cmp.flipped["episode_key"], cmp.flipped["change"])) == {
        keys[1]: "gained", keys[2]: "gained", keys[3]: "lost"}
    assert cmp.outcomes.loc["error", "success"] == 1 and cmp.outcomes.loc["success", "timeout"] == 1
    assert cmp.mcnemar_p == pytest.approx(1.0)  # 2 vs 1 flips: no evidence either way
    assert analysis.mcnemar_exact_p(0, 8) == pytest.approx(2 / 256)
    assert analysis.mcnemar_exact_p(0, 0) == 1.0


def test_mixed_protocols_are_refused_unless_allowed(tmp_path, capsys):
    a = write_run(tmp_path, SyntheticRun("a", protocol_hash="proto-1111"))
    b = write_run(tmp_path, SyntheticRun("b", mode="autoregressive", protocol_hash="proto-2222"))
    ra, rb = analysis.load_run(a), analysis.load_run(b)
    with pytest.raises(analysis.MixedProtocolError, match="proto-1111.*proto-2222"):
        analysis.speedup(ra, rb)
    with pytest.raises(analysis.MixedProtocolError, match="allow_mixed_protocols"):
        analysis.paired_comparison(ra, rb)
    assert analysis.paired_comparison(ra, rb, allow_mixed_protocols=True).num_matched == len(ra.episodes)
    assert report_main([str(a), "--baseline", str(b), "--out", str(tmp_path / "r1")]) == 2
    assert "different protocols" in capsys.readouterr().err
    assert report_main([str(a), "--baseline", str(b), "--out", str(tmp_path / "r2"),
                        "--allow-mixed-protocols"]) == 0


def test_a_baseline_evaluated_in_pieces_is_merged_without_double_counting(tmp_path, capsys):
    """Trials 0-1 and 2-3 of the baseline were recorded as two runs; compared as one they match
    every key of the run, and a second run over the same trials is refused, not counted twice."""
    run = SyntheticRun("run", mode="autoregressive", num_tasks=2, num_trials=4)
    keys = episode_keys(run)
    run.outcomes = {k: "success" for k in keys}
    first = SyntheticRun("base-t0", mode="autoregressive", num_tasks=2, num_trials=2)
    second = SyntheticRun("base-t2", mode="autoregressive", num_tasks=2, num_trials=2, first_trial=2)
    first.outcomes = {k: "timeout" if k.endswith("/0") else "success" for k in episode_keys(first)}
    second.outcomes = {k: "timeout" for k in episode_keys(second)}
    a, b1, b2 = (write_run(tmp_path, s) for s in (run, first, second))

    merged = analysis.merge_runs(analysis.load_runs([b1, b2]))
    assert merged.label == "base-t0+base-t2" and set(merged.episodes["run"]) == {merged.label}
    assert sorted(merged.episodes["episode_key"]) == sorted(keys) and len(merged.chunks) == len(keys) * 6
    cmp = analysis.paired_comparison(analysis.load_run(a), merged)
    assert (cmp.num_matched, cmp.gained, cmp.lost, cmp.num_only_run) == (8, 6, 0, 0)

    again = write_run(tmp_path / "again", first)
    with pytest.raises(analysis.RecordsError, match="both hold episode 'libero_spatial/0/0'.*twice"):
        analysis.merge_runs(analysis.load_runs([b1, again]))
    other = write_run(tmp_path, SyntheticRun("base-t2-other", mode="autoregressive", num_tasks=2, num_trials=2,
                                             first_trial=2, protocol_hash="proto-bbbb"))
    with pytest.raises(analysis.MixedProtocolError):
        analysis.merge_runs(analysis.load_runs([b1, other]))

    assert report_main([str(a), "--baseline", f"{b1},{b2}", "--out", str(tmp_path / "r")]) == 0
    paired = json.loads((tmp_path / "r" / "report.json").read_text())["tables"]["paired"]
    assert [(p["baseline"], p["num_matched"], p["gained"]) for p in paired] == [("base-t0+base-t2", 8, 6)]
    assert report_main([str(a), "--baseline", f"{b1},{again}", "--out", str(tmp_path / "r2")]) == 2
    assert "count it twice" in capsys.readouterr().err


def test_agreement_counts_how_many_policies_solve_each_key(tmp_path, capsys):
    from analysis.agreement import agreement_tables, main as agreement_main, solved_matrix
    spec = dict(mode="autoregressive", num_tasks=2, num_trials=2)
    keys = episode_keys(SyntheticRun("x", **spec))  # libero_spatial/0/0, /0/1, /1/0, /1/1
    solved_by = {"p": {keys[0], keys[1]}, "q": {keys[0], keys[2]}, "r": {keys[0]}}
    dirs = {}
    for name, solved in solved_by.items():
        run = SyntheticRun(name, **spec)
        run.outcomes = {k: "success" if k in solved else "timeout" for k in keys}
        dirs[name] = write_run(tmp_path, run)
    # q evaluated in two pieces over disjoint trials: merged back into one policy.
    q0 = SyntheticRun("q-t0", **dict(spec, num_trials=1))
    q1 = SyntheticRun("q-t1", **dict(spec, num_trials=1), first_trial=1)
    for piece in (q0, q1):
        piece.outcomes = {k: "success" if k in solved_by["q"] else "timeout" for k in episode_keys(piece)}
    pieces = f"{write_run(tmp_path, q0)},{write_run(tmp_path, q1)}"

    solved = solved_matrix({n: analysis.load_run(d) for n, d in dirs.items()})
    tables = agreement_tables(solved)
    assert tables["histogram"]["num_keys"].tolist() == [1, 2, 0, 1]  # keys solved by 0, 1, 2, 3 policies
    tasks = tables["tasks"].set_index("task_id")
    assert tasks.loc[0, ["all_solve", "none_solve", "mixed"]].tolist() == [1, 0, 1]
    assert tasks.loc[1, ["all_solve", "none_solve", "mixed"]].tolist() == [0, 1, 1]
    assert tables["policies"]["num_success"].tolist() == [2, 2, 1]

    out = tmp_path / "agreement.json"
    assert agreement_main([f"p={dirs['p']}", f"q={pieces}", f"r={dirs['r']}", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [h["num_keys"] for h in doc["histogram"]] == [1, 2, 0, 1] and len(doc["sources"]["q"]) == 2
    assert doc["solved"][keys[2]] == [False, True, False]

    assert agreement_main([f"p={dirs['p']}"]) == 2
    assert "at least two" in capsys.readouterr().err
    assert agreement_main([f"p={dirs['p']}", str(dirs["q"])]) == 2
    assert "not NAME=RUNS" in capsys.readouterr().err
    other = write_run(tmp_path, SyntheticRun("other", **dict(spec, first_trial=5)))
    assert agreement_main([f"p={dirs['p']}", f"o={other}"]) == 2
    assert "share no episode key" in capsys.readouterr().err


# ---- bad input --------------------------------------------------------------------------------

def test_bad_foreign_and_empty_runs_give_clear_errors(tmp_path):
    good = write_run(tmp_path, SyntheticRun("good"))
    part = next((good / "episodes").glob("part-*.parquet"))

    garbage = write_run(tmp_path, SyntheticRun("garbage"))
    next((garbage / "episodes").glob("part-*.parquet")).write_bytes(b"not parquet at all")
    with pytest.raises(analysis.RecordsError, match="not a readable Parquet file"):
        analysis.load_run(garbage)

    foreign = write_run(tmp_path, SyntheticRun("foreign"))
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), foreign / "episodes" / "part-00007.parquet")
    with pytest.raises(analysis.RecordsError, match=r"part-00007.*not an rsd_ray episode record.*episode_key"):
        analysis.load_run(foreign)

    swapped = write_run(tmp_path, SyntheticRun("swapped"))
    chunk_part = next((swapped / "chunks").glob("part-*.parquet"))
    (swapped / "episodes" / "part-00008.parquet").write_bytes(chunk_part.read_bytes())
    with pytest.raises(analysis.RecordsError, match="lacks the required column.*outcome"):
        analysis.load_run(swapped)

    wrong_type = write_run(tmp_path, SyntheticRun("wrongtype"))
    table = pq.read_table(part)
    table = table.set_column(table.schema.get_field_index("task_id"), "task_id",
                             pa.array(["three"] * table.num_rows))
    pq.write_table(table, wrong_type / "episodes" / "part-00009.parquet")
    with pytest.raises(analysis.RecordsError, match="'task_id' has type string; expected int32"):
        analysis.load_run(wrong_type)

    empty = tmp_path / "empty"
    (empty / "episodes").mkdir(parents=True)
    (empty / "manifest.json").write_text(json.dumps({"run_id": "empty"}))
    with pytest.raises(analysis.EmptyRunError, match="no episode records"):
        analysis.load_run(empty)
    pq.write_table(EPISODE_SCHEMA.empty_table(), empty / "episodes" / "part-00000.parquet")
    with pytest.raises(analysis.EmptyRunError, match="0 rows"):
        analysis.load_run(empty)

    with pytest.raises(analysis.RecordsError, match="does not exist"):
        analysis.load_run(tmp_path / "missing")
    with pytest.raises(analysis.RecordsError, match="matches no run directory"):
        analysis.load_runs(str(tmp_path / "nothing-*"))
    (tmp_path / "notrun").mkdir()
    with pytest.raises(analysis.RecordsError, match="not a run directory"):
        analysis.load_run(tmp_path / "notrun")
    with pytest.raises(analysis.RecordsError, match=r"holds run directories \(empty, .*\): pass '.*/\*' to load them all"):
        analysis.load_run(tmp_path)
    bad_manifest = write_run(tmp_path, SyntheticRun("badmanifest"))
    (bad_manifest / "manifest.json").write_text("{not json")
    with pytest.raises(analysis.RecordsError, match="not valid JSON"):
        analysis.load_run(bad_manifest)
    assert report_main([str(empty)]) == 2


def test_inconsistent_success_flag_is_reported(tmp_path):
    run_dir = write_run(tmp_path, SyntheticRun("inconsistent", num_tasks=1, num_trials=2))
    rows = pq.read_table(run_dir / "episodes").to_pylist()
    rows[0].update(outcome="timeout", success=True)
    for p in (run_dir / "episodes").glob("*.parquet"):
        p.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=EPISODE_SCHEMA), run_dir / "episodes" / "part-00000.parquet")
    with pytest.raises(analysis.RecordsError, match="success != \\(outcome == 'success'\\)"):
        analysis.load_run(run_dir)


# ---- figures and report -----------------------------------------------------------------------

def test_figures_have_no_overlapping_or_clipped_text(sweep):
    for make in (plots.plot_success_by_task, plots.plot_latency_over_episodes,
                 plots.plot_acceptance_by_layer, plots.plot_success_vs_latency):
        assert plots.layout_problems(make(sweep)) == [], make.__name__
    # The checker itself must be able to fail.
    fig = plots._figure(3, 2)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "first label", transform=ax.transAxes)
    ax.text(0.52, 0.5, "second label", transform=ax.transAxes)
    fig.text(0.9, 0.1, "runs off the right edge of the figure")
    problems = plots.layout_problems(fig)
    assert any("overlaps" in p for p in problems) and any("cut off" in p for p in problems)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_writes_every_png_and_markdown(sweep_dir, capsys):
    runs = [str(sweep_dir / "spec-*"), str(sweep_dir / "parallel")]
    assert report_main([*runs, "--baseline", str(sweep_dir / "ar")]) == 0
    out_dir = sweep_dir / "spec-exact-k2" / "report"  # default: the first run's report/ folder
    for name in FIGURES:
        assert _is_png(out_dir / f"{name}.png"), name
    markdown = (out_dir / "report.md").read_text()
    for name in FIGURES:
        assert f"({name}.png)" in markdown
    assert "## Speedup against the baseline" in markdown and "| spec-tau0.5 | ar |" in markdown
    records = json.loads((out_dir / "report.json").read_text())
    assert records["baseline"] == "ar" and {r["label"] for r in records["runs"]} >= {"ar", "parallel"}
    assert set(records["tables"]) == {"runs", "suites", "tasks", "latency", "latency breakdown", "acceptance",
                                      "speedup", "paired", "flipped"}
    assert {r["run"] for r in records["tables"]["tasks"]} >= {"ar", "parallel"}
    stdout = capsys.readouterr().out
    assert "Success per task" in stdout and "Draft acceptance" in stdout and "wrote" in stdout


def test_report_module_on_a_plain_run_without_chunks(tmp_path):
    """`python -m analysis.report` on one autoregressive run without chunk records: every figure
    is still written (acceptance says there is nothing speculative to show)."""
    run_dir = write_run(tmp_path, SyntheticRun("plain", mode="autoregressive", write_chunks=False,
                                               outcomes={"libero_spatial/0/0": "error"}))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(run_dir), "--out", str(out_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        assert _is_png(out_dir / f"{name}.png"), name
    assert "episode medians" in proc.stdout


# ---- notebook and imports ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def notebook_run_dirs(ray_local, tmp_path_factory) -> tuple[str, str]:
    """(RSD_RUN_DIRS, RSD_BASELINE) for the notebook test: two small REAL runs of the evaluator
    (LIBERO envs in Ray actors, a tiny random RSD checkpoint), autoregressive as the baseline and
    speculative K=3, on the same episode keys."""
    from rsd_ray.config import ClusterConfig, DecodeConfig, EnvConfig, EvalConfig, PolicyConfig, RecordsConfig
    from rsd_ray.driver import run_eval
    from rsd_ray.policy.checkpoint import build_random_checkpoint
    from rsd_ray.policy.configuration_rsd import RSDConfig

    root = tmp_path_factory.mktemp("real_runs")
    checkpoint = build_random_checkpoint(root / "tiny_rsd", RSDConfig.tiny(), seed=0)
    for name, mode in (("ar", "autoregressive"), ("spec", "speculative")):
        run_eval(EvalConfig(
            env=EnvConfig(suite="libero_spatial", task_ids=[0, 1], num_trials=2, max_steps=16),
            policy=PolicyConfig(kind="rsd", checkpoint=str(checkpoint), max_batch=4),
            decode=DecodeConfig(mode=mode, draft_layers=3),
            records=RecordsConfig(output_dir=str(root / "runs"), run_name=name),
            cluster=ClusterConfig(num_env_actors=2, show_progress=False)))
    return str(root / "runs" / "*"), str(root / "runs" / "ar")


@pytest.mark.libero
@pytest.mark.ray
def test_notebook_executes_headless(notebook_run_dirs, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run_dirs, baseline = notebook_run_dirs
    monkeypatch.setenv("RSD_RUN_DIRS", run_dirs)
    monkeypatch.setenv("RSD_BASELINE", baseline)
    monkeypatch.setenv("RSD_REPORT_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name=_kernel_name(),
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "success_rate" in html and "mean_accepted_layers" in html and "speedup" in html
    for name in FIGURES:
        assert _is_png(tmp_path / "figures" / f"{name}.png")


def _kernel_name() -> str:
    """'python3' when its spec exists; else register this interpreter's ipykernel for the user."""
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" in KernelSpecManager().find_kernel_specs():
        return "python3"
    from ipykernel.kernelspec import install
    install(user=True, kernel_name="rsd-analysis-test")
    return "rsd-analysis-test"


def test_analysis_imports_without_torch_or_ray():
    code = ("import analysis, analysis.report, sys; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'libero')]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
