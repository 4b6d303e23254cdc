"""Development harness: run the scripted expert in-process (no Ray) on LIBERO tasks.

Follows the evaluation protocol chunk by chunk, as the evaluator does: seed 0, reset,
set_init_state(trial), 10 no-op wait steps, then per chunk: read the privileged state at the
boundary, execute all 8 actions open loop, stop at the env's own `done` or at the suite's
step limit. Cameras are off by default (images are irrelevant to a privileged expert and a
step costs ~22 ms instead of ~280 ms). One env per task, reused across trials.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsd_ray.env.privileged import read_privileged_state
from rsd_ray.policy.base import Observation
from rsd_ray.policy.expert import ScriptedExpert
from rsd_ray.protocol import CHUNK_STEPS, MAX_STEPS, NOOP_ACTION, NUM_INIT_STATES, NUM_WAIT_STEPS, check_suite, episode_key


@dataclass(frozen=True)
class ExpertEvalConfig:
    suite: str = "libero_spatial"
    tasks: tuple[int, ...] = tuple(range(10))
    trials: tuple[int, ...] = tuple(range(5))     # init-state indices
    use_camera_obs: bool = False
    # hard_reset=False env + zeroed gripper action: ~0.3 s instead of ~5 s per reset, and the
    # same states as a hard reset (LIBERO.md; re-checked by tests/test_expert.py).
    soft_reset: bool = False
    out: str = ""                                  # default bench/results/expert_<suite>_cpu.json
    verbose: bool = False

    def __post_init__(self) -> None:
        check_suite(self.suite)
        bad = [t for t in self.trials if not 0 <= t < NUM_INIT_STATES]
        if bad:
            raise ValueError(f"trials={bad} out of range; expected init-state indices 0..{NUM_INIT_STATES - 1}")


@dataclass
class EpisodeResult:
    task_id: int
    trial: int
    success: bool
    num_steps: int           # steps after the wait steps
    wall_s: float
    phase_log: list[str] = field(default_factory=list)


def make_env(suite_name: str, task_id: int, use_camera_obs: bool = False,
             soft_reset: bool = False) -> tuple[Any, Any, np.ndarray]:
    """(env, task, init_states [50, S]) for one LIBERO task, built as the evaluator builds it."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()[suite_name]()
    num_tasks = suite.get_num_tasks()
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id={task_id} out of range for {suite_name}; expected 0..{num_tasks - 1}")
    task = suite.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=256, camera_widths=256,
                             use_camera_obs=use_camera_obs, hard_reset=not soft_reset)
    return env, task, np.asarray(suite.get_task_init_states(task_id))


def _observation(raw: dict[str, Any], env: Any, instruction: str, key: str, chunk_index: int) -> Observation:
    quat = np.asarray(raw["robot0_eef_quat"], dtype=np.float64)      # xyzw
    angle = 2.0 * np.arccos(np.clip(quat[3], -1.0, 1.0))
    sin = np.sqrt(max(1.0 - quat[3] ** 2, 0.0))
    axis_angle = quat[:3] * angle / sin if sin > 1e-8 else np.zeros(3)
    proprio = np.concatenate([raw["robot0_eef_pos"], axis_angle, raw["robot0_gripper_qpos"]]).astype(np.float32)
    blank = np.zeros((1, 1, 3), dtype=np.uint8)   # images are not rendered for the expert
    return Observation(agentview=raw.get("agentview_image", blank), wrist=raw.get("robot0_eye_in_hand_image", blank),
                       proprio=proprio, instruction=instruction, episode_key=key, chunk_index=chunk_index,
                       privileged=read_privileged_state(env))


def run_episode(env: Any, policy: ScriptedExpert, suite_name: str, task_id: int, trial: int,
                init_state: np.ndarray, instruction: str, max_steps: int | None = None) -> EpisodeResult:
    """One episode under the protocol; success only when the env itself reports done."""
    max_steps = MAX_STEPS[suite_name] if max_steps is None else max_steps
    key = episode_key(suite_name, task_id, trial)
    t0 = time.perf_counter()
    env.seed(0)
    env.reset()
    # A soft reset keeps the Panda gripper's incremental command from the last episode;
    # zero it so the episode matches a hard reset (a no-op after a hard reset).
    env.env.robots[0].gripper.current_action = np.zeros_like(env.env.robots[0].gripper.current_action)
    raw = env.set_init_state(init_state)
    for _ in range(NUM_WAIT_STEPS):
        raw, _, _, _ = env.step(list(NOOP_ACTION))
    num_steps, done, chunk_index = 0, False, 0
    while num_steps < max_steps and not done:
        obs = _observation(raw, env, instruction, key, chunk_index)
        chunk = policy.predict([obs]).chunks[0]                   # [T, A]
        for action in chunk[:CHUNK_STEPS]:
            raw, _, done, _ = env.step(action.tolist())
            num_steps += 1
            if done or num_steps >= max_steps:
                break
        chunk_index += 1
    log = policy.episode_log(key)
    policy.end_episode(key)
    return EpisodeResult(task_id=task_id, trial=trial, success=bool(done), num_steps=num_steps,
                         wall_s=time.perf_counter() - t0, phase_log=log)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def run(cfg: ExpertEvalConfig) -> dict[str, Any]:
    policy = ScriptedExpert()
    policy.trace = True     # boundary poses go into the log printed for failed episodes
    episodes: list[EpisodeResult] = []
    rows = []
    for task_id in cfg.tasks:
        env, task, init_states = make_env(cfg.suite, task_id, cfg.use_camera_obs, cfg.soft_reset)
        try:
            results = []
            for trial in cfg.trials:
                result = run_episode(env, policy, cfg.suite, task_id, trial, init_states[trial], task.language)
                results.append(result)
                if cfg.verbose or not result.success:
                    print(f"  task {task_id} trial {trial}: {'ok' if result.success else 'FAIL'} "
                          f"{result.num_steps} steps  {chr(10).join(result.phase_log)}", flush=True)
        finally:
            env.close()
        episodes += results
        ok_steps = [r.num_steps for r in results if r.success]
        rows.append({"task": task_id, "successes": sum(r.success for r in results), "trials": len(results),
                     "steps_median": int(np.median(ok_steps)) if ok_steps else "-",
                     "steps_max": max(ok_steps) if ok_steps else "-",
                     "wall_s_median": round(float(np.median([r.wall_s for r in results])), 1),
                     "instruction": task.language})
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
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
           "episodes": [asdict(e) for e in episodes]}
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
    parser.add_argument("--soft-reset", action="store_true", help="hard_reset=False env (faster resets)")
    parser.add_argument("--out", default="")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    trials = tuple(range(int(args.trials))) if args.trials.isdigit() else _int_list(args.trials)
    run(ExpertEvalConfig(suite=args.suite, tasks=_int_list(args.tasks), trials=trials,
                         use_camera_obs=args.use_camera_obs, soft_reset=args.soft_reset, out=args.out, verbose=args.verbose))


if __name__ == "__main__":
    main()
