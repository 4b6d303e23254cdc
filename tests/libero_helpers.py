"""Helpers for tests that build real LIBERO envs."""
from __future__ import annotations

import numpy as np


def stage_bowl_on_plate(env) -> None:
    """libero_spatial task 0's goal is (on akita_black_bowl_1 plate_1): put the bowl there
    through the simulator, as if a policy had carried it."""
    sim_env = env.env
    joint = sim_env.objects_dict["akita_black_bowl_1"].joints[-1]
    qpos = sim_env.sim.data.get_joint_qpos(joint).copy()
    plate = sim_env.sim.data.body_xpos[sim_env.obj_body_id["plate_1"]]
    qpos[:2] = plate[:2]
    qpos[2] = plate[2] + 0.03
    sim_env.sim.data.set_joint_qpos(joint, qpos)
    sim_env.sim.forward()


def random_actions(num: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    actions = np.zeros((num, 7))
    actions[:, :6] = rng.uniform(-0.5, 0.5, (num, 6))
    actions[:, 6] = np.where(np.arange(num) % 16 < 8, -1.0, 1.0)
    return actions
