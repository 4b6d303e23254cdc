"""The env side's image and proprio recipe (no simulator import): what turns a LIBERO
observation dict into the `Observation` a policy sees. Policy-family processing (JPEG round
trip, crops, normalisation) is the policy's processor, not this module's.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

AGENTVIEW_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"


def rotate_180(image: np.ndarray) -> np.ndarray:
    """LIBERO renders upside down and mirrored relative to the training demos (OpenVLA-OFT's
    `get_libero_image` flips both axes); the copy makes the array contiguous for Ray."""
    return np.ascontiguousarray(image[::-1, ::-1])


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8, antialiased Lanczos (identity when already sized)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def policy_image(raw: np.ndarray, size: int) -> np.ndarray:
    return resize(rotate_180(raw), size)


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """[4] (x, y, z, w) -> [3] axis * angle, the convention of robosuite's transform_utils."""
    q = np.asarray(quat_xyzw, dtype=np.float64).copy()
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(w) / den


def proprio_state(raw_obs: dict) -> np.ndarray:
    """[8] float32: eef position (3), eef orientation as axis-angle (3), gripper joints (2)."""
    return np.concatenate([
        np.asarray(raw_obs["robot0_eef_pos"], dtype=np.float64),
        quat_to_axis_angle(raw_obs["robot0_eef_quat"]),
        np.asarray(raw_obs["robot0_gripper_qpos"], dtype=np.float64),
    ]).astype(np.float32)
