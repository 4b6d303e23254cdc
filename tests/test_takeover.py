"""Takeover demonstrations: when the expert may take an episode over from a learner, which chunks
become samples, and a real LIBERO episode the expert finishes after a learner's start."""
from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np
import pytest

from rsd_ray.config import EvalConfig, PolicyConfig
from rsd_ray.policy.expert import ScriptedExpert
from rsd_ray.policy.simple import NoopPolicy
from rsd_ray.policy.takeover import TakeoverPolicy, expert_may_take_over, takeover_chunk
from rsd_ray.protocol import NOOP_ACTION
from tests.test_expert import _obs, _state

GOAL = [["on", "cream_cheese_1", "plate_1"]]
START_Z = 0.90   # cream cheese bottom in _state


def _with(state, *, fingers=0.039, contact=False, raised=0.0):
    state["gripper_qpos"] = np.array([fingers, -fingers])
    state["gripper_contact"] = contact
    obj = state["objects"]["cream_cheese_1"]
    obj["aabb_min"] = obj["aabb_min"] + np.array([0.0, 0.0, raised])
    return state


@pytest.mark.parametrize("fingers,contact,raised,expected", [
    (0.039, False, 0.0, True),     # open: the expert's approach opens them anyway
    (0.001, False, 0.0, True),     # shut on air (a missed grasp): reopening is the right label
    (0.001, True, 0.0, False),     # shut and touching: maybe a grasp in progress
    (0.015, True, 0.0, False),     # closing on the object
    (0.039, False, 0.05, False),   # object raised with the hand (an expanding grasp holds open)
])
def test_takeover_waits_while_the_learner_may_hold_the_object(fingers, contact, raised, expected):
    state = _with(_state(GOAL), fingers=fingers, contact=contact, raised=raised)
    assert expert_may_take_over(state, START_Z) is expected


def test_learner_drives_until_the_switch_chunk_then_the_expert_does():
    policy = TakeoverPolicy(NoopPolicy(), ScriptedExpert(), 2, 2)
    key = "libero_goal/0/0"
    for chunk_index in range(4):
        out = policy.predict([_obs(_with(_state(GOAL)), chunk_index=chunk_index, key=key)])
        by_expert = out.stats[0].is_demonstration
        assert by_expert is (chunk_index >= 2)
        if by_expert:   # the expert heads for the object (+x, +y) with the gripper open
            assert out.chunks[0, 0, 0] > 0.5 and np.all(out.chunks[0, :, 6] == -1.0)
        else:
            np.testing.assert_array_equal(out.chunks[0], np.tile(NOOP_ACTION, (8, 1)))
    # A learner holding the object past the switch chunk keeps driving.
    other = "libero_goal/0/1"
    policy.predict([_obs(_with(_state(GOAL)), chunk_index=0, key=other)])
    held = _with(_state(GOAL), fingers=0.02, contact=True, raised=0.05)
    assert not policy.predict([_obs(held, chunk_index=5, key=other)]).stats[0].is_demonstration
    policy.end_episode(key)
    assert policy.expert.phase_of(key) == "none"


def test_takeover_chunk_is_reproducible_and_in_range():
    draws = [takeover_chunk(f"libero_spatial/0/{t}", 0, 2, 12) for t in range(200)]
    assert draws == [takeover_chunk(f"libero_spatial/0/{t}", 0, 2, 12) for t in range(200)]
    assert min(draws) == 2 and max(draws) == 12


def test_takeover_config_is_checked_and_part_of_the_run_identity():
    with pytest.raises(ValueError, match="takeover_chunks"):
        PolicyConfig(kind="takeover", takeover_chunks=[5, 2])
    config = EvalConfig(policy=PolicyConfig(kind="takeover", takeover_chunks=[2, 12]))
    assert config.run_identity("abc")["takeover_chunks"] == [2, 12]
    assert "takeover_chunks" not in EvalConfig().run_identity("abc")


def test_expert_finishes_a_real_episode_after_the_learner_and_only_its_chunks_are_samples():
    pytest.importorskip("libero.libero")
    from rsd_ray.config import EnvConfig
    from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner, inline_client

    # The no-op policy stands in for a learner that lost three chunks doing nothing useful.
    policy = TakeoverPolicy(NoopPolicy(), ScriptedExpert(), 3, 3)
    runner = EpisodeRunner(EnvConfig(suite="libero_spatial"), inline_client(policy), needs_privileged_state=True,
                           record_chunks=True, record_samples=True)
    try:
        result = runner.run(EpisodeRequest(episode_key="libero_spatial/0/0"))
    finally:
        runner.close()
    assert result.episode["outcome"] == "success", result.episode["error"]
    assert [s["chunk_index"] for s in result.samples] == list(range(3, result.episode["num_chunks"]))
    assert len(result.chunks) == result.episode["num_chunks"]
    # The localisation labels follow the task: the hand starts > 20 cm from the bowl, closes in,
    # then holds it by the rim (a fixed ~5 cm from its centre) while the plate comes 25 cm nearer.
    offsets = np.asarray([s["goal_offsets"] for s in result.samples])
    to_bowl, to_plate = np.linalg.norm(offsets[:, :2], axis=1), np.linalg.norm(offsets[:, 3:5], axis=1)
    held = to_bowl[2:]
    assert to_bowl[0] > 0.2 and held.max() < 0.06 and np.ptp(held) < 0.01, to_bowl
    assert to_plate[0] - to_plate[-1] > 0.25, to_plate
