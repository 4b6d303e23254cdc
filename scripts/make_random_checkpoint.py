"""Build and save a randomly initialised RSD policy checkpoint (tests, smoke runs, benchmarks).

    python scripts/make_random_checkpoint.py --out checkpoints/rsd_tiny_random
    python scripts/make_random_checkpoint.py --shape llama2_7b --out checkpoints/rsd_7b_shape
        (7B shape: writes rsd_config.json only unless --with-weights; load it with
         RSDPolicy.from_pretrained(..., allow_random_weights=True))
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rsd_ray.policy.checkpoint import build_random_checkpoint, save_config_only
from rsd_ray.policy.configuration_rsd import RSDConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=["tiny", "llama2_7b"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-weights", action="store_true", help="7B shape: also write random weights (~27 GB)")
    args = parser.parse_args()
    if args.shape == "tiny":
        path = build_random_checkpoint(args.out, RSDConfig.tiny(), args.seed)
    elif args.with_weights:
        path = build_random_checkpoint(args.out, RSDConfig.llama2_7b_shape(dtype="float32"), args.seed)
    else:
        path = save_config_only(args.out, RSDConfig.llama2_7b_shape())
    print(f"wrote {path}: {sorted(p.name for p in Path(path).iterdir())}")


if __name__ == "__main__":
    main()
