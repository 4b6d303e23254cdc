"""scripts/episode_sheet.py on a real libero_spatial env with the shipped default policy: two chunks,
one sheet column per chunk boundary (agentview over wrist), a log row per chunk with the
simulator's view of the gripper and the goal's object."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_contact_sheet_places_agentview_over_wrist():
    from episode_sheet import contact_sheet

    views = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    wrists = [np.full((4, 4, 3), 100 + i, np.uint8) for i in range(3)]
    sheet = contact_sheet(views, wrists, columns=2)
    assert sheet.shape == (16, 8, 3)
    assert sheet[0, 4, 0] == 1 and sheet[4, 4, 0] == 101          # chunk 1: row 0, column 1
    assert sheet[8, 0, 0] == 2 and sheet[12, 0, 0] == 102         # chunk 2 wraps to the next row pair
    assert not sheet[8:, 4:].any()                                 # nothing after the last chunk


def test_episode_sheet_on_a_real_env(tmp_path):
    from PIL import Image
    from episode_sheet import main

    out = tmp_path / "sheet"
    assert main(["--checkpoint", str(ROOT / "checkpoints/default_policy"), "--task_id", "0", "--trial", "0",
                 "--max_steps", "16", "--columns", "4", "--scale", "1", "--out", str(out)]) == 0
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["episode"]["episode_key"] == "libero_spatial/0/0" and log["episode"]["num_steps"] == 16
    assert [c["chunk"] for c in log["chunks"]] == [0, 1]
    assert log["chunks"][0]["goal_object"]["name"] == "akita_black_bowl_1"
    assert np.asarray(log["chunks"][1]["actions"]).shape == (8, 7)
    # the arm moved during chunk 0, and the log's gripper site is the proprio's eef position
    first, second = (np.asarray(c["gripper_site"]) for c in log["chunks"])
    assert np.linalg.norm(second - first) > 1e-3
    np.testing.assert_allclose(first, log["chunks"][0]["proprio"][:3], atol=1e-3)
    from rsd_ray.protocol import POLICY_IMAGE_SIZE
    with Image.open(out.with_suffix(".png")) as image:            # 4 columns, one row pair of env frames
        assert image.size == (4 * POLICY_IMAGE_SIZE, 2 * POLICY_IMAGE_SIZE)
