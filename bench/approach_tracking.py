"""Does a policy's approach follow the object, or replay a memorised path? Regress the gripper's
position on the goal object's, across init states, at fixed chunks of the approach.

For each task the policy runs the first `--steps` steps of each init state (cameras on, exactly
as in evaluation; the privileged state is read only to measure, never shown to a learned
policy). At each chunk in `--chunks`, over the trials, it fits eef_x ~ a + b * object_x (and the
same in y): b = 1 means the hand goes where the object is, b = 0 that it goes to the same place
whatever the init state. `err_sd` is the spread of (eef - object) across trials: the error a
memorised path makes grows with the object's own spread. The scripted expert (`--policy expert`)
is the reference: its slopes are ~1 by construction. Per task it also projects 2.5 cm of object
travel (at the object's mean position) into the 64x64 agentview image the policy sees (after its
`agentview_crop`, if its config has one), the pixels it has to tell apart. Prints a table, writes JSON.

  python bench/approach_tracking.py --checkpoint checkpoints/default_policy --tasks 4 9 --trials 30-37
  python bench/approach_tracking.py --policy expert --tasks 9 --trials 30-37
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402

from bench.common import format_table, write_json  # noqa: E402
from rsd_ray.env.privileged import goal_object  # noqa: E402   (numpy only)

AGENTVIEW_PX = 64          # the policy's image size
TRAVEL_M = 0.025


class _Recorder:
    """Wraps a policy; keeps (chunk, eef, goal object) of every observation it answers."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.rows = policy, []

    def predict(self, observations: list[Any]) -> Any:
        for obs in observations:
            obj = goal_object(obs.privileged)
            if obj is not None:
                self.rows.append({"key": obs.episode_key, "chunk": obs.chunk_index,
                                  "eef": np.asarray(obs.privileged["eef_pos"], dtype=float).tolist(),
                                  "object": np.asarray(obj["pos"], dtype=float).tolist()})
        if getattr(self.policy, "needs_privileged_state", False):
            return self.policy.predict(observations)
        # A learned policy never sees the privileged state it was run with.
        return self.policy.predict([replace(obs, privileged=None) for obs in observations])


def fit_tracking(rows: list[dict[str, Any]], chunk: int) -> dict[str, float] | None:
    """Slope, error mean and error spread per axis at one chunk, over the trials that reached it."""
    at = [r for r in rows if r["chunk"] == chunk]
    if len(at) < 3:
        return None
    eef, obj = np.array([r["eef"] for r in at]), np.array([r["object"] for r in at])
    out: dict[str, float] = {"chunk": chunk, "trials": len(at), "eef_z": float(eef[:, 2].mean())}
    for axis, name in ((0, "x"), (1, "y")):
        spread = float(obj[:, axis].std())
        slope = float(np.polyfit(obj[:, axis], eef[:, axis], 1)[0]) if spread > 1e-4 else float("nan")
        err = eef[:, axis] - obj[:, axis]
        out.update({f"object_sd_{name}_cm": 100 * spread, f"slope_{name}": slope,
                    f"err_mean_{name}_cm": 100 * float(err.mean()), f"err_sd_{name}_cm": 100 * float(err.std())})
    return out


def agentview_px_per_travel(suite: str, task: int, trial: int, point: np.ndarray,
                            crop: tuple[float, float, float, float] | None = None) -> dict[str, float]:
    """Image displacement (px, at AGENTVIEW_PX) of TRAVEL_M of world x and y travel at `point`,
    by a pinhole projection with the agentview camera's pose and fovy read from the sim; with a
    (top, left, bottom, right) crop, in the cropped frame resized to AGENTVIEW_PX."""
    from rsd_ray.env.libero_env import LiberoTaskEnv, load_task
    env = LiberoTaskEnv(load_task(suite, task))
    try:
        env.start_trial(trial)
        sim = env.robosuite_env.sim
        cam = sim.model.camera_name2id("agentview")
        pos, rot = sim.data.cam_xpos[cam].copy(), sim.data.cam_xmat[cam].reshape(3, 3).copy()
        focal = (AGENTVIEW_PX / 2) / np.tan(np.radians(sim.model.cam_fovy[cam]) / 2)
    finally:
        env.close()

    top, left, bottom, right = crop or (0.0, 0.0, 1.0, 1.0)
    zoom = np.array([1.0 / (right - left), 1.0 / (bottom - top)])     # (columns, rows)

    def pixel(p: np.ndarray) -> np.ndarray:
        c = rot.T @ (p - pos)               # MuJoCo camera frame: x right, y up, looking down -z
        return zoom * np.array([focal * c[0] / -c[2], -focal * c[1] / -c[2]])

    return {f"px_per_{TRAVEL_M * 100:g}cm_{name}": float(np.linalg.norm(pixel(point + TRAVEL_M * np.eye(3)[axis]) - pixel(point)))
            for axis, name in ((0, "x"), (1, "y"))}


def parse_range(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="rsd", choices=["rsd", "expert"])
    parser.add_argument("--checkpoint", default="checkpoints/default_policy")
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 9])
    parser.add_argument("--trials", type=parse_range, default=parse_range("30-37"), help="init states, e.g. 30-37 or 1,5,9")
    parser.add_argument("--chunks", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    parser.add_argument("--steps", type=int, default=72, help="steps run per episode (the approach only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/approach_tracking_<name>_cpu.json)")
    args = parser.parse_args(argv)

    from rsd_ray.config import DecodeConfig, EnvConfig, PolicyConfig
    from rsd_ray.driver import episode_seed
    from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner, inline_client
    from rsd_ray.policy.registry import build_policy
    from rsd_ray.protocol import episode_key

    policy_config = (PolicyConfig(kind="expert") if args.policy == "expert"
                     else PolicyConfig(kind="rsd", checkpoint=args.checkpoint))
    recorder = _Recorder(build_policy(policy_config, DecodeConfig(mode="autoregressive")))
    config = getattr(recorder.policy, "config", None)
    crop = getattr(config, "agentview_crop", None)
    runner = EpisodeRunner(EnvConfig(suite=args.suite, max_steps=args.steps), inline_client(recorder),
                           needs_privileged_state=True, record_chunks=False)
    table = []
    try:
        from tqdm import tqdm
        keys = [episode_key(args.suite, task, trial) for task in args.tasks for trial in args.trials]
        for key in tqdm(keys, desc="approach episodes"):
            runner.run(EpisodeRequest(episode_key=key, seed=episode_seed(args.seed, key)))
    finally:
        runner.close()
    image_scale = {}
    for task in args.tasks:
        prefix = f"{args.suite}/{task}/"
        rows = [r for r in recorder.rows if r["key"].startswith(prefix)]
        if rows:
            mean_object = np.mean([r["object"] for r in rows], axis=0)
            image_scale[task] = agentview_px_per_travel(args.suite, task, args.trials[0], mean_object, crop)
            print(f"task {task}: {TRAVEL_M * 100:g} cm of object travel = "
                  + ", ".join(f"{v:.2f} px ({k[-1]})" for k, v in image_scale[task].items()) + " in agentview")
        for chunk in args.chunks:
            fit = fit_tracking(rows, chunk)
            if fit is not None:
                table.append({"task": task, **fit})
    columns = ["task", "chunk", "trials", "eef_z", "object_sd_x_cm", "slope_x", "err_mean_x_cm", "err_sd_x_cm",
               "object_sd_y_cm", "slope_y", "err_mean_y_cm", "err_sd_y_cm"]
    print(format_table(table, columns))
    name = "expert" if args.policy == "expert" else Path(args.checkpoint).name
    out = args.out or f"bench/results/approach_tracking_{name}_cpu.json"
    path = write_json(out, {"benchmark": "approach_tracking", "policy": args.policy, "checkpoint": args.checkpoint,
                            "suite": args.suite, "tasks": args.tasks, "trials": args.trials, "steps": args.steps,
                            "seed": args.seed, "command": " ".join(sys.argv), "table": table, "agentview_crop": crop,
                            "agentview_px": image_scale, "observations": recorder.rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
