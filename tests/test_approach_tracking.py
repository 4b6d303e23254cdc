"""bench/approach_tracking.py's fit: slope 1 for a hand that goes where the object is, 0 for a
memorised path, and the error spread of a memorised path equal to the object's own spread."""
from __future__ import annotations

import numpy as np
import pytest

from bench.approach_tracking import fit_tracking, parse_range


def _rows(objects: np.ndarray, eefs: np.ndarray, chunk: int = 5) -> list[dict]:
    return [{"key": f"libero_spatial/9/{i}", "chunk": chunk, "eef": e.tolist(), "object": o.tolist()}
            for i, (o, e) in enumerate(zip(objects, eefs))]


def test_a_tracking_hand_has_slope_one_and_a_memorised_path_slope_zero():
    rng = np.random.default_rng(0)
    objects = np.column_stack([rng.normal(0.02, 0.025, 8), rng.normal(-0.27, 0.01, 8), np.full(8, 1.13)])
    tracking = fit_tracking(_rows(objects, objects + [0.01, -0.02, 0.1]), 5)
    assert tracking["slope_x"] == pytest.approx(1.0) and tracking["slope_y"] == pytest.approx(1.0)
    assert tracking["err_mean_x_cm"] == pytest.approx(1.0) and tracking["err_sd_x_cm"] == pytest.approx(0.0, abs=1e-9)
    memorised = fit_tracking(_rows(objects, np.tile([0.03, -0.29, 1.2], (8, 1))), 5)
    assert memorised["slope_x"] == pytest.approx(0.0, abs=1e-9)
    assert memorised["err_sd_x_cm"] == pytest.approx(memorised["object_sd_x_cm"])
    assert memorised["trials"] == 8 and memorised["eef_z"] == pytest.approx(1.2)


def test_a_chunk_reached_by_fewer_than_three_trials_is_not_fitted():
    objects = np.zeros((2, 3))
    assert fit_tracking(_rows(objects, objects), 5) is None
    assert fit_tracking(_rows(np.zeros((4, 3)), np.zeros((4, 3)), chunk=5), 6) is None


def test_trial_ranges_parse():
    assert parse_range("30-33") == [30, 31, 32, 33] and parse_range("1,5,9") == [1, 5, 9]
