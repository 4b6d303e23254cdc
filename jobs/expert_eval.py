"""Development harness: run the scripted expert in-process (no Ray) on LIBERO tasks.

Runs the evaluator's own episode loop (rsd_ray.env.episode.EpisodeRunner: protocol, fixture
seeding, soft-reset env reuse) with the expert called inline, so tuning results carry over
to `jobs/eval_libero.py --policy.kind=expert` exactly. Cameras are off by default (images are
irrelevant to a privileged expert and a step costs ~22 ms instead of ~280 ms).

Run:
    OMP_NUM_THREADS=1 .venv/bin/python jobs/expert_eval.py --suite libero_spatial --tasks 0-9 --trials 5
Prints a per-task table and writes bench/results/expert_<suite>_cpu.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")            # before robosuite / mujoco import
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import argparse
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsd_ray.config import EnvConfig
from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner, inline_client
from rsd_ray.policy.expert import ScriptedExpert
from rsd_ray.protocol import NUM_INIT_STATES, check_suite, episode_key


@dataclass(frozen=True)
class ExpertEvalConfig:
    suite: str = "libero_spatial"
    tasks: tuple[int, ...] = tuple(range(10))
    trials: tuple[int, ...] = tuple(range(5))     # init-state indices
    use_camera_obs: bool = False
    action_noise_std: float = 0.0                  # DART noise on executed actions (collect_demos)
    out: str = ""                                  # default bench/results/expert_<suite>_cpu.json
    verbose: bool = False

    def __post_init__(self) -> None:
        check_suite(self.suite)
        bad = [t for t in self.trials if not 0 <= t < NUM_INIT_STATES]
        if bad:
            raise ValueError(f"trials={bad} out of range; expected init-state indices 0..{NUM_INIT_STATES - 1}")


def make_runner(suite: str, policy: ScriptedExpert, use_camera_obs: bool = False,
                action_noise_std: float = 0.0) -> EpisodeRunner:
    """The evaluator's own episode loop (rsd_ray.env.episode), in this process, one env per task."""
    return EpisodeRunner(EnvConfig(suite=suite, action_noise_std=action_noise_std), inline_client(policy),
                         needs_privileged_state=True, record_chunks=False, use_cameras=use_camera_obs)


def run_episode(runner: EpisodeRunner, policy: ScriptedExpert, suite: str, task_id: int,
                trial: int) -> dict[str, Any]:
    """One episode under the evaluation protocol; returns its episode record plus the expert's
    phase log. Success only when the env itself reported done."""
    key = episode_key(suite, task_id, trial)
    episode = runner.run(EpisodeRequest(episode_key=key)).episode
    episode["phase_log"] = policy.episode_log(key)
    policy.end_episode(key)
    if episode["outcome"] == "error":
        raise RuntimeError(f"{key} crashed: {episode['error']}")
    return episode


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def run(cfg: ExpertEvalConfig) -> dict[str, Any]:
    policy = ScriptedExpert()
    policy.trace = True     # boundary poses go into the log printed for failed episodes
    episodes: list[dict[str, Any]] = []
    rows = []
    runner = make_runner(cfg.suite, policy, cfg.use_camera_obs, cfg.action_noise_std)
    try:
        for task_id in cfg.tasks:
            results = []
            for trial in cfg.trials:
                result = run_episode(runner, policy, cfg.suite, task_id, trial)
                results.append(result)
                if cfg.verbose or not result["success"]:
                    print(f"  task {task_id} trial {trial}: {'ok' if result['success'] else 'FAIL'} "
                          f"{result['num_steps']} steps  {chr(10).join(result['phase_log'])}", flush=True)
            episodes += results
            ok_steps = [r["num_steps"] for r in results if r["success"]]
            rows.append({"task": task_id, "successes": sum(r["success"] for r in results), "trials": len(results),
                         "steps_median": int(np.median(ok_steps)) if ok_steps else "-",
                         "steps_max": max(ok_steps) if ok_steps else "-",
                         "wall_s_median": round(float(np.median([r["wall_s"] for r in results])), 1),
                         "instruction": results[0]["instruction"]})
            print(format_table(rows[-1:], list(rows[-1])), flush=True)
    finally:
        runner.close()
    total = sum(r["successes"] for r in rows)
    count = sum(r["trials"] for r in rows)
    print(f"\n{cfg.suite}: {total}/{count} = {100.0 * total / max(count, 1):.1f} %")
    print(format_table(rows, ["task", "successes", "trials", "steps_median", "steps_max", "wall_s_median"]))
    import mujoco
    import robosuite
    out = {"device": "cpu", "host": platform.node(),
           "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                        "mujoco": mujoco.__version__, "robosuite": robosuite.__version__},
           "config": asdict(cfg), "policy": policy.describe(), "rows": rows,
           "success_rate": total / max(count, 1),
           "episodes": episodes}
    path = Path(cfg.out or f"bench/results/expert_{cfg.suite}_cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


def _int_list(text: str) -> tuple[int, ...]:
    """'0-4' -> (0, 1, 2, 3, 4); '1,3,7' -> (1, 3, 7)."""
    values: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            values += range(int(lo), int(hi) + 1)
        elif part:
            values.append(int(part))
    return tuple(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--tasks", default="0-9", help="e.g. 0-9 or 1,4,9")
    parser.add_argument("--trials", default="5", help="a count N (init states 0..N-1) or a list like 10-14")
    parser.add_argument("--use-camera-obs", action="store_true")
    parser.add_argument("--soft-reset", action="store_true", help="(kept for old commands: resets are always soft)")
    parser.add_argument("--action-noise-std", type=float, default=0.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    trials = tuple(range(int(args.trials))) if args.trials.isdigit() else _int_list(args.trials)
    run(ExpertEvalConfig(suite=args.suite, tasks=_int_list(args.tasks), trials=trials,
                         use_camera_obs=args.use_camera_obs, action_noise_std=args.action_noise_std,
                         out=args.out, verbose=args.verbose))


if __name__ == "__main__":
    main()
