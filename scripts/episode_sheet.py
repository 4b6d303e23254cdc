"""Look at one episode: roll a policy out on one LIBERO trial (in this process, no Ray) and write
what it saw and did at every chunk boundary, to see *how* an episode fails, not only that it did.

    python scripts/episode_sheet.py --task_id 9 --trial 30 --out runs/sheets/spatial_9_30
    python scripts/episode_sheet.py --checkpoint /path/to/ckpt --suite libero_object --task_id 2 --trial 0 \
        --out /tmp/obj_2_0 --mode speculative

Writes OUT.png (one column per chunk: the agentview image the policy received over the wrist
image, at the env's resolution before the model's own resize, in rows of --columns chunks) and
OUT.json (per chunk: proprio, the gripper site and the goal's object from the simulator, whether
the gripper touches anything but the robot, the chunk's actions). The simulator state is read
for the log only; the policy sees exactly what the evaluator gives it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def contact_sheet(agentviews: list[np.ndarray], wrists: list[np.ndarray], columns: int) -> np.ndarray:
    """[rows * 2 * S, columns * S, 3]: chunk i at row i // columns, agentview over wrist."""
    if not agentviews:
        raise ValueError("contact_sheet: no frames (the episode ended before its first chunk)")
    size = agentviews[0].shape[0]
    rows = -(-len(agentviews) // columns)
    sheet = np.zeros((rows * 2 * size, columns * size, 3), np.uint8)
    for i, (top, bottom) in enumerate(zip(agentviews, wrists)):
        r, c = divmod(i, columns)
        sheet[2 * r * size:(2 * r + 1) * size, c * size:(c + 1) * size] = top
        sheet[(2 * r + 1) * size:(2 * r + 2) * size, c * size:(c + 1) * size] = bottom
    return sheet


def _goal_object(privileged: dict[str, Any]) -> dict[str, Any]:
    _, name, target = privileged["goal"][0]
    entry = privileged["objects"][name]
    centre = (np.asarray(entry["aabb_min"]) + np.asarray(entry["aabb_max"])) / 2.0
    return {"name": name, "target": target, "centre": np.round(centre, 4).tolist(),
            "bottom_z": round(float(entry["aabb_min"][2]), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/default_policy")
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--task_id", type=int, required=True)
    parser.add_argument("--trial", type=int, required=True, help="init state index (0-49)")
    parser.add_argument("--mode", default="autoregressive", choices=["autoregressive", "speculative"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=None, help="cut the episode short (default: the suite's)")
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="resize the PNG by this factor (e.g. 0.5 for a smaller file)")
    parser.add_argument("--out", required=True, help="path prefix: OUT.png and OUT.json")
    args = parser.parse_args(argv)

    from PIL import Image

    from rsd_ray.config import DecodeConfig, EnvConfig
    from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner
    from rsd_ray.policy.rsd_policy import RSDPolicy
    from rsd_ray.protocol import episode_key

    policy = RSDPolicy.from_pretrained(args.checkpoint, DecodeConfig(mode=args.mode))
    agentviews: list[np.ndarray] = []
    wrists: list[np.ndarray] = []
    log: list[dict[str, Any]] = []

    def client(obs):
        agentviews.append(np.asarray(obs.agentview))
        wrists.append(np.asarray(obs.wrist))
        out = policy.predict([obs])
        privileged = obs.privileged or {}
        log.append({"chunk": obs.chunk_index, "proprio": np.round(obs.proprio, 4).tolist(),
                    "gripper_site": np.round(privileged["eef_pos"], 4).tolist(),
                    "goal_object": _goal_object(privileged),
                    "gripper_contact": privileged.get("gripper_contact"),
                    "actions": np.round(out.chunks[0], 3).tolist()})
        return out.chunks[0], out.stats[0]

    env_config = EnvConfig(suite=args.suite, task_ids=[args.task_id], first_trial=args.trial, num_trials=1,
                           max_steps=args.max_steps)
    runner = EpisodeRunner(env_config, client, needs_privileged_state=True, record_chunks=False)
    key = episode_key(args.suite, args.task_id, args.trial)
    try:
        result = runner.run(EpisodeRequest(episode_key=key, seed=args.seed))
    finally:
        runner.close()
    episode = result.episode
    if episode["outcome"] == "error":
        print(episode["error"], file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = Image.fromarray(contact_sheet(agentviews, wrists, args.columns))
    if args.scale != 1.0:
        size = (max(1, round(sheet.width * args.scale)), max(1, round(sheet.height * args.scale)))
        sheet = sheet.resize(size, Image.LANCZOS if args.scale < 1 else Image.NEAREST)
    sheet.save(out.with_suffix(".png"))
    summary = {k: episode[k] for k in ("episode_key", "outcome", "num_steps", "num_chunks", "instruction")}
    out.with_suffix(".json").write_text(json.dumps({"episode": summary, "checkpoint": args.checkpoint,
                                                    "mode": args.mode, "chunks": log}, indent=1))
    print(f"{key}: {episode['outcome']} after {episode['num_steps']} steps; wrote {out.with_suffix('.png')} "
          f"and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
