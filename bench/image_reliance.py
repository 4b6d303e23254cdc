"""Does a policy read the scene from its cameras, or only the arm's state and the instruction?
Swap a camera's image between demonstrations and see how much the predictions move.

Every sample of the given demonstration runs is paired with a sample of the *same task and chunk
index* from another episode (a cyclic shift within each (task, chunk) group), whose objects sit
elsewhere (perturbed init state) while the arm is at about the same stage. The policy is then
scored against each sample's own expert chunk with (a) its own images, (b) the partner's agentview,
(c) the partner's wrist view, (d) both. A policy that localises the objects from a camera gets
worse when that camera's image is swapped; one that ignores it scores the same. `partner_arm_mse`
is how far the partner's expert chunk is from the sample's own: what swapping *all* the inputs
would cost a perfect policy. Scores: teacher-forced cross-entropy and accuracy of RFSQ layer 0
(the coarse action), and the arm MSE of the greedy autoregressive chunk (raw env units).
Prints a table, writes JSON.

  python bench/image_reliance.py --checkpoint checkpoints/default_policy --data runs/demos/s61b-libero_spatial
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, write_json  # noqa: E402

CONDITIONS = {"own images": (), "agentview swapped": (0,), "wrist swapped": (1,), "both swapped": (0, 1)}


def partner_rows(tasks: list[int], chunks: list[int], episodes: list[str]) -> list[int]:
    """Row i -> a row of the same (task, chunk index) from another episode (itself if none)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(tasks, chunks)):
        groups[key].append(i)
    partner = list(range(len(tasks)))
    for rows in groups.values():
        rows = sorted(rows, key=lambda r: episodes[r])
        for j, r in enumerate(rows):
            other = rows[(j + 1) % len(rows)]
            if episodes[other] != episodes[r]:
                partner[r] = other
    return partner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/default_policy")
    parser.add_argument("--data", nargs="+", required=True, help="demonstration run directories (samples/)")
    parser.add_argument("--max_rows", type=int, default=0, help="0: every sample")
    parser.add_argument("--num_threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/image_reliance_<name>_cpu.json)")
    args = parser.parse_args(argv)

    import torch

    from jobs.train_policy import action_errors, evaluate_tokens
    from rsd_ray.policy.checkpoint import load_policy
    from rsd_ray.policy.training import action_chunks, build_demo_tensors, sort_samples
    from rsd_ray.records.writer import read_samples

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    loaded = load_policy(args.checkpoint)
    table = sort_samples(read_samples(args.data))
    if args.max_rows:
        table = table.slice(0, args.max_rows)
    demos = build_demo_tensors(table, loaded.model.config, loaded.tokenizer, loaded.proprio)
    gold = torch.from_numpy(action_chunks(table))
    partner = torch.tensor(partner_rows(table.column("task_id").to_pylist(), table.column("chunk_index").to_pylist(),
                                        demos.episode_keys))
    index = torch.nonzero(partner != torch.arange(len(partner))).flatten()   # rows that have a partner
    print(f"[image_reliance] {len(demos)} samples, {len(index)} with a partner of the same task and chunk index")

    rows = []
    for name, cameras in CONDITIONS.items():
        images = demos.images.clone()
        for camera in cameras:
            images[:, camera] = demos.images[partner, camera]
        scored = replace(demos, images=images)
        tokens = evaluate_tokens(loaded.model, scored, index)
        actions = action_errors(loaded.model, loaded.tokenizer, scored, index, gold)
        rows.append({"condition": name, "layer0_ce": tokens["ce_per_layer"][0], "layer0_acc": tokens["acc_per_layer"][0],
                     "arm_mse": actions["arm_mse"], "gripper_sign_agreement": actions["gripper_sign_agreement"]})
        print(f"[image_reliance] {name}: {rows[-1]}")
    partner_arm_mse = float((gold[partner[index], :, :6] - gold[index, :, :6]).pow(2).mean())
    print(format_table(rows, ["condition", "layer0_ce", "layer0_acc", "arm_mse", "gripper_sign_agreement"]))
    print(f"partner_arm_mse (the partner's expert chunk against the sample's own): {partner_arm_mse:.4g}")
    name = Path(args.checkpoint).name
    out = args.out or f"bench/results/image_reliance_{name}_cpu.json"
    path = write_json(out, {"benchmark": "image_reliance", "checkpoint": args.checkpoint, "data": args.data,
                            "num_samples": len(demos), "num_paired": len(index), "command": " ".join(sys.argv),
                            "table": rows, "partner_arm_mse": partner_arm_mse})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
