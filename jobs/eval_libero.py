"""Evaluate a policy on LIBERO with Ray: EnvActors on every CPU, a batching PolicyActor.

    python jobs/eval_libero.py                                  # the default: see EvalConfig
    python jobs/eval_libero.py --env.suite=libero_object --env.num_trials=5 --policy.kind=noop
    ray job submit --working-dir . -- python jobs/eval_libero.py --cluster.address=auto ...

Re-running the same command resumes: episodes already in the output are skipped.
Exit codes: 0 done, 2 configuration error (message names the field), 1 anything else.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import parse_or_exit
    from rsd_ray.config import EvalConfig
    from rsd_ray.records.manifest import IncompatibleRunError
    from rsd_ray.records.writer import CorruptRecordsError

    config = parse_or_exit(EvalConfig, argv)
    try:
        from rsd_ray.driver import run_eval
        summary = run_eval(config)
    except (IncompatibleRunError, CorruptRecordsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.num_episodes else 1


if __name__ == "__main__":
    sys.exit(main())
