"""Average the weights of fine-tunes of one policy checkpoint (a "model soup").

    python scripts/average_checkpoints.py --out runs/candidates/soup checkpoints/default_policy runs/candidates/default_policy_v17

Two fine-tunes of one checkpoint on different data can each be worse than their average: each
one's episode outcomes vary a lot from key to key, and the average keeps what they share. The
sources must share rsd_config.json, the RFSQ tokenizer and the proprio normalisation (refused
otherwise). The output is a normal policy directory; its training.json and README.md name the
sources and carry each one's own training.json, so the lineage can be rebuilt.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rsd_ray.policy.checkpoint import average_policies


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="policy checkpoint directories (at least two)")
    parser.add_argument("--out", required=True, help="new directory for the averaged policy")
    args = parser.parse_args(argv)
    out = average_policies(args.sources, args.out)
    command = shlex.join(["python", "scripts/average_checkpoints.py", *(argv if argv is not None else sys.argv[1:])])
    averaged_from = []
    for source in map(Path, args.sources):
        training = source / "training.json"
        averaged_from.append({"path": str(source),
                              "training": json.loads(training.read_text()) if training.is_file() else None})
    (out / "training.json").write_text(json.dumps({"command": command, "averaged_from": averaged_from}, indent=2) + "\n")
    lines = [f"# RSD policy checkpoint `{out.name}`: the uniform average of {len(args.sources)} policies", "",
             "Made by", "", "```", command, "```", "", "from (each one's training.json is under `averaged_from` in "
             "this directory's training.json):", ""]
    for entry in averaged_from:
        training = entry["training"] or {}
        lines.append(f"- `{entry['path']}`: trained by `{training.get('command', 'unknown')}` "
                     f"(data fingerprint `{training.get('data_fingerprint')}`)")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: the average of {', '.join(args.sources)}")
    return out


if __name__ == "__main__":
    main()
