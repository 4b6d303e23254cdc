"""How many of several policies solve each episode key: separates the keys every policy solves or
fails (systematic) from the ones that flip between policies of the same quality (chance).

Two fine-tunes of one checkpoint with the same validation loss can disagree on a quarter of the
keys, so one policy's success on 200 keys mixes its quality with this flipping. Run it on
policies evaluated over the same keys:

  python -m analysis.agreement v16=runs/eval_v16/v16-ar-t30-39,runs/eval_v16/v16-ar-t40-49 \\
      v19=runs/eval_v20/v19-ar-t30 --out agreement.json

Each NAME=RUNS merges RUNS (a path, glob or comma-separated list over disjoint trials) into one
policy. Only keys that every policy ran are counted. Prints the tables, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from analysis.runs import MixedProtocolError, RecordsError, Run, check_same_protocol, load_runs, merge_runs


def solved_matrix(policies: Mapping[str, Run], allow_mixed_protocols: bool = False) -> pd.DataFrame:
    """Boolean frame, one row per episode key that every policy ran (index: episode_key; columns
    task_id, then one per policy, True where it succeeded)."""
    if len(policies) < 2:
        raise ValueError(f"got {len(policies)} policy; agreement needs at least two")
    check_same_protocol(list(policies.values()), allow_mixed_protocols)
    frames = [run.episodes.set_index("episode_key")["outcome"].eq("success").rename(name)
              for name, run in policies.items()]
    solved = pd.concat(frames, axis=1, join="inner")
    if solved.empty:
        raise ValueError(f"the policies {list(policies)} share no episode key; evaluate them on the same trials")
    first = next(iter(policies.values())).episodes.set_index("episode_key")["task_id"]
    return pd.concat([first.reindex(solved.index).astype(int), solved], axis=1).sort_index()


def agreement_tables(solved: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """'histogram': keys by how many policies solve them; 'tasks': per task, keys all policies
    solve, none solves, and the rest (mixed); 'policies': each policy's successes."""
    names = [c for c in solved.columns if c != "task_id"]
    count = solved[names].sum(axis=1)
    histogram = count.value_counts().reindex(range(len(names) + 1), fill_value=0)
    histogram = histogram.rename_axis("num_policies_solving").reset_index(name="num_keys")
    by_task = pd.DataFrame({"task_id": solved["task_id"], "all": count == len(names), "none": count == 0})
    tasks = by_task.groupby("task_id").agg(keys=("all", "size"), all_solve=("all", "sum"), none_solve=("none", "sum"))
    tasks["mixed"] = tasks["keys"] - tasks["all_solve"] - tasks["none_solve"]
    tasks.loc["all"] = tasks.sum()
    policies = pd.DataFrame({"policy": names, "num_success": [int(solved[n].sum()) for n in names],
                             "num_keys": len(solved)})
    return {"histogram": histogram, "tasks": tasks.reset_index(), "policies": policies}


def _parse_policy(spec: str) -> tuple[str, str]:
    name, sep, runs = spec.partition("=")
    if not sep or not name or not runs:
        raise ValueError(f"policy {spec!r} is not NAME=RUNS (e.g. v16=runs/eval_v16/t30,runs/eval_v16/t40)")
    return name, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("policies", nargs="+", metavar="NAME=RUNS", help="a policy and the runs that evaluated it")
    parser.add_argument("--out", metavar="JSON", help="write the tables and the per-key matrix here")
    parser.add_argument("--allow-mixed-protocols", action="store_true")
    args = parser.parse_args(argv)
    try:
        policies: dict[str, Run] = {}
        for spec in args.policies:
            name, runs = _parse_policy(spec)
            if name in policies:
                raise ValueError(f"policy name {name!r} is given twice")
            policies[name] = merge_runs(load_runs(runs), label=name, allow_mixed_protocols=args.allow_mixed_protocols)
        solved = solved_matrix(policies, args.allow_mixed_protocols)
    except (RecordsError, MixedProtocolError, ValueError) as exc:
        print(f"agreement: error: {exc}", file=sys.stderr)
        return 2
    tables = agreement_tables(solved)
    for title, table in tables.items():
        print(f"\n== {title} ==\n{table.to_string(index=False)}")
    if args.out:
        doc = {"sources": {n: r.manifest["merged_from"] for n, r in policies.items()},  # set by merge_runs
               **{k: t.to_dict(orient="records") for k, t in tables.items()},
               "solved": {key: [bool(v) for v in row] for key, row in solved.drop(columns="task_id").iterrows()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
