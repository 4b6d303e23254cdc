"""Env-side throughput: the seeds' sequential loop against rsd_ray's env actors.

  (a) seeds   one process, sequential episodes, a fresh env per trial (the customer's loop builds
              OffScreenRenderEnv inside the trial loop), every step rendered, policy inline;
  (b) rsd_ray the same episodes and policy, with: render gating only, env reuse (soft reset) only,
              both, in one process; then both through Ray with 1..N EnvActors and a PolicyActor.
Outcomes must be identical across variants (checked, and printed). Prints a table, writes JSON.

  python bench/env_throughput.py                          # expert policy, 2 tasks x 2 trials
  python bench/env_throughput.py --policy random --tasks 0 1 2 --trials 3 --actors 1 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

from bench.common import format_table, write_json  # noqa: E402
from rsd_ray.config import ClusterConfig, DecodeConfig, EnvConfig, EvalConfig, PolicyConfig, RecordsConfig  # noqa: E402
from rsd_ray.driver import episode_seed  # noqa: E402
from rsd_ray.protocol import MAX_STEPS, episode_key  # noqa: E402


def in_process(env_config: EnvConfig, policy_config: PolicyConfig, keys: list[str]) -> dict:
    """Episodes one after another in this process, policy called inline."""
    from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner, inline_client
    from rsd_ray.policy.registry import build_policy, needs_privileged_state

    policy = build_policy(policy_config, DecodeConfig())
    runner = EpisodeRunner(env_config, inline_client(policy), needs_privileged_state=needs_privileged_state(policy_config),
                           record_chunks=False, use_cameras=True)
    t0 = time.perf_counter()
    episodes = []
    try:
        for key in keys:
            episodes.append(runner.run(EpisodeRequest(episode_key=key, seed=episode_seed(0, key))).episode)
            policy.end_episode(key)
    finally:
        runner.close()
    return {"wall_s": time.perf_counter() - t0, "episodes": episodes}


def with_ray(env_config: EnvConfig, policy_config: PolicyConfig, tasks: list[int], trials: int,
             actors: int) -> dict:
    import ray

    from rsd_ray.driver import run_eval
    from rsd_ray.records.writer import read_table

    if not ray.is_initialized():      # cluster start-up is paid once per cluster, not per run: untimed
        ray.init(include_dashboard=False, log_to_driver=False)

    with tempfile.TemporaryDirectory() as out:
        cfg = EvalConfig(env=replace(env_config, task_ids=tasks, num_trials=trials, cameras="on"),
                         policy=policy_config,
                         records=RecordsConfig(output_dir=out, run_name="bench", record_chunks=False),
                         cluster=ClusterConfig(num_env_actors=actors, show_progress=False))
        t0 = time.perf_counter()
        run_eval(cfg)
        wall = time.perf_counter() - t0
        episodes = read_table(Path(out) / "bench").to_pylist()
    return {"wall_s": wall, "episodes": episodes}


def summarize(name: str, result: dict, baseline: dict | None, num_actors: int) -> dict:
    eps = result["episodes"]
    steps = sum(e["num_steps"] + 10 for e in eps)           # + the wait steps
    row = {"variant": name, "actors": num_actors, "episodes": len(eps), "wall_s": result["wall_s"],
           "s_per_episode_median": statistics.median(e["wall_s"] for e in eps),
           "episodes_per_min": 60 * len(eps) / result["wall_s"], "env_steps_per_s": steps / result["wall_s"],
           "successes": sum(e["outcome"] == "success" for e in eps),
           "outcomes": {e["episode_key"]: (e["outcome"], e["num_steps"]) for e in eps}}
    if baseline is not None:
        row["speedup"] = baseline["wall_s"] / result["wall_s"]
        row["outcomes_identical"] = row["outcomes"] == summarize("", baseline, None, 1)["outcomes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--tasks", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--policy", default="expert", choices=["expert", "random", "noop"])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", default="bench/results/env_throughput_cpu.json")
    args = parser.parse_args()

    keys = [episode_key(args.suite, t, i) for t in args.tasks for i in range(args.trials)]
    policy = PolicyConfig(kind=args.policy)
    base = EnvConfig(suite=args.suite, max_steps=args.max_steps, cameras="on")
    variants = [
        ("seeds: fresh env per trial, render every step", replace(base, skip_unused_renders=False, reuse_env=False)),
        ("render gating only", replace(base, skip_unused_renders=True, reuse_env=False)),
        ("env reuse (soft reset) only", replace(base, skip_unused_renders=False, reuse_env=True)),
        ("render gating + env reuse", replace(base, skip_unused_renders=True, reuse_env=True)),
    ]
    rows, baseline = [], None
    for name, env_config in variants:
        print(f"[bench] {name} ...", flush=True)
        result = in_process(env_config, policy, keys)
        baseline = baseline or result
        rows.append(summarize(name, result, baseline, 1))
    for n in args.actors:
        print(f"[bench] rsd_ray, {n} EnvActor(s) ...", flush=True)
        result = with_ray(replace(base, skip_unused_renders=True, reuse_env=True), policy, args.tasks, args.trials, n)
        rows.append(summarize(f"rsd_ray Ray, {n} EnvActor(s)", result, baseline, n))
    import ray
    ray.shutdown()
    print(f"\n{args.suite} tasks {args.tasks} x {args.trials} trials, policy {args.policy}, "
          f"max steps {args.max_steps or MAX_STEPS[args.suite]}\n")
    print(format_table(rows, ["variant", "actors", "episodes", "wall_s", "s_per_episode_median",
                              "episodes_per_min", "env_steps_per_s", "successes", "speedup", "outcomes_identical"]))
    path = write_json(args.out, {"config": vars(args), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
