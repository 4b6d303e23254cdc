"""LIBERO evaluation protocol and the tensor alphabet shared by every module.

Defaults follow OpenVLA-OFT's published LIBERO evaluation (experiments/robot/libero/): 10 wait
steps with the no-op action, per-suite step limits (each about 1.1x the longest demonstration
of the suite), 256x256 renders rotated 180 degrees. Every value here is only a default: the
run's config carries the value actually used, and the manifest records it.
"""
from __future__ import annotations

# Tensor alphabet (see STYLE.md): B slots, T steps per chunk, A action dims, D latent dims,
# L RFSQ layers, V levels per latent dim, K draft layers, P prefix length, H hidden size.
CHUNK_STEPS = 8          # T
ACTION_DIM = 7           # A: xyz delta (3), axis-angle delta (3), gripper (1)
LATENT_DIM = 16          # D
NUM_RFSQ_LAYERS = 8      # L
NUM_LEVELS = 7           # V
PROPRIO_DIM = 8          # eef position (3) + eef axis-angle (3) + gripper joint positions (2)

SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")

# Steps after the wait steps; the longest training demonstration of each suite, rounded up.
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_TASKS: dict[str, int] = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10,
                             "libero_10": 10, "libero_90": 90}
NUM_WAIT_STEPS = 10
# Gripper -1 = open in the env's action space; zeros elsewhere hold the arm still.
NOOP_ACTION: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
RENDER_SIZE = 256
POLICY_IMAGE_SIZE = 224
NUM_INIT_STATES = 50     # every LIBERO task ships 50 fixed init states

OUTCOMES: tuple[str, ...] = ("success", "timeout", "error")


def check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r} is not a LIBERO suite; expected one of {', '.join(SUITES)}")
    return suite


def check_task_ids(suite: str, task_ids: list[int] | None) -> list[int]:
    """None means every task of the suite; out-of-range ids are a clear error."""
    num = NUM_TASKS[check_suite(suite)]
    if task_ids is None:
        return list(range(num))
    bad = [t for t in task_ids if not 0 <= t < num]
    if bad:
        raise ValueError(f"task ids {bad} are out of range for {suite}; expected 0..{num - 1}")
    return list(task_ids)


def episode_key(suite: str, task_id: int, trial: int) -> str:
    """The identity of an episode in records, queues and resume: 'libero_spatial/3/17'."""
    return f"{suite}/{task_id}/{trial}"


def parse_episode_key(key: str) -> tuple[str, int, int]:
    parts = key.split("/")
    if len(parts) != 3:
        raise ValueError(f"episode key {key!r} is not 'suite/task_id/trial'")
    return check_suite(parts[0]), int(parts[1]), int(parts[2])
