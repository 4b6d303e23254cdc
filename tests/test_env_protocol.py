"""The LIBERO protocol on a real env (libero_spatial task 0): wait steps, step limits, image
recipe, open-loop chunks, success from the env's own check, errors from bad policies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsd_ray.config import EnvConfig
from rsd_ray.env.episode import EpisodeRequest, EpisodeRunner
from rsd_ray.env.preprocess import policy_image
from rsd_ray.policy.base import ChunkStats
from rsd_ray.protocol import MAX_STEPS, NOOP_ACTION
from tests.libero_helpers import stage_bowl_on_plate

pytestmark = pytest.mark.libero
FIXTURES = Path(__file__).parent / "fixtures"
NOOP_CHUNK = np.tile(np.asarray(NOOP_ACTION, np.float32), (8, 1))


class RecordingClient:
    """An in-process policy that answers `chunk` and remembers what it saw."""

    def __init__(self, chunk: np.ndarray = NOOP_CHUNK):
        self.chunk = chunk
        self.observations = []

    def __call__(self, obs):
        self.observations.append(obs)
        return self.chunk, ChunkStats(policy_ms=0.1)


@pytest.fixture(scope="module")
def runner():
    r = EpisodeRunner(EnvConfig(suite="libero_spatial"), RecordingClient())
    yield r
    r.close()


@pytest.fixture()
def count_steps(runner):
    """Counts env.step calls of the runner's env (built on first use)."""
    runner._env_for("libero_spatial", 0)
    env = runner.task_env
    calls = []
    original = env.step

    def counting(action, render):
        calls.append(np.array(action))
        return original(action, render)

    env.step = counting
    yield calls
    env.step = original


def run(runner, client, max_steps=None, after_init=None, trial=0):
    runner.policy_client = client
    runner.after_init = after_init
    runner.config.max_steps = max_steps
    return runner.run(EpisodeRequest(episode_key=f"libero_spatial/0/{trial}"))


def test_images_are_rotated_resized_and_pinned(runner):
    client = RecordingClient()
    run(runner, client, max_steps=1)
    obs = client.observations[0]
    assert obs.agentview.shape == (224, 224, 3) and obs.agentview.dtype == np.uint8
    assert obs.wrist.shape == (224, 224, 3)
    raw = runner.task_env.render_now()
    assert raw["agentview_image"].shape == (256, 256, 3)
    # Orientation: our image is the raw render turned 180 degrees (both axes), then resized.
    env = runner.task_env
    env.start_trial(0)
    raw = env.render_now()
    np.testing.assert_array_equal(policy_image(raw["agentview_image"], 224),
                                  np.asarray(Image.open(FIXTURES / "spatial0_trial0_agentview.png")))
    np.testing.assert_array_equal(policy_image(raw["robot0_eye_in_hand_image"], 224),
                                  np.asarray(Image.open(FIXTURES / "spatial0_trial0_wrist.png")))
    assert not np.array_equal(policy_image(raw["agentview_image"], 224),
                              policy_image(raw["agentview_image"][::-1], 224))


def test_first_observation_is_the_rendered_boundary_after_wait_steps(runner):
    client = RecordingClient()
    run(runner, client, max_steps=1)
    first = client.observations[0]
    # The first chunk boundary is the observation after the 10th wait step, rendered for real.
    assert first.agentview.std() > 10 and first.chunk_index == 0
    pinned = np.asarray(Image.open(FIXTURES / "spatial0_trial0_after_wait_agentview.png"))
    np.testing.assert_array_equal(first.agentview, pinned)


def test_wait_steps_then_every_action_of_every_chunk(runner, count_steps):
    chunk = np.tile(np.asarray(NOOP_ACTION, np.float32), (8, 1))
    chunk[:, 0] = np.arange(8) * 0.01           # distinct actions, to check their order
    result = run(runner, RecordingClient(chunk), max_steps=20)
    assert len(count_steps) == 10 + 20
    np.testing.assert_array_equal(np.stack(count_steps[:10]), np.tile(NOOP_ACTION, (10, 1)))
    executed = np.stack(count_steps[10:])
    np.testing.assert_allclose(executed[:, 0], np.concatenate([chunk[:, 0], chunk[:, 0], chunk[:4, 0]]))
    assert result.episode["outcome"] == "timeout" and result.episode["num_steps"] == 20
    assert [c["num_actions_executed"] for c in result.chunks] == [8, 8, 4]
    assert [c["step"] for c in result.chunks] == [0, 8, 16]


def test_execute_steps_runs_a_prefix_of_each_chunk_then_asks_from_the_newer_observation(runner, count_steps):
    """Receding horizon (env.execute_steps=3): actions 0..2 of every chunk, then a fresh policy call
    whose observation is rendered after the 3rd action, not a stale one."""
    chunk = np.tile(np.asarray(NOOP_ACTION, np.float32), (8, 1))
    chunk[:, 0] = 0.5 + np.arange(8) * 0.01
    client = RecordingClient(chunk)
    runner.config.execute_steps = 3
    try:
        result = run(runner, client, max_steps=8)
    finally:
        runner.config.execute_steps = 8
    executed = np.stack(count_steps[10:])
    np.testing.assert_allclose(executed[:, 0], np.concatenate([chunk[:3, 0], chunk[:3, 0], chunk[:2, 0]]))
    assert [c["num_actions_executed"] for c in result.chunks] == [3, 3, 2]
    assert [c["step"] for c in result.chunks] == [0, 3, 6]
    assert [o.chunk_index for o in client.observations] == [0, 1, 2]
    # The arm moved along x between boundaries, and the proprio the policy saw followed it.
    xs = [o.proprio[0] for o in client.observations]
    assert xs[0] < xs[1] < xs[2]
    assert not np.array_equal(client.observations[1].agentview, client.observations[2].agentview)


def test_action_noise_perturbs_executed_translation_but_samples_keep_the_policy_chunk(runner, count_steps):
    """DART demonstrations (env.action_noise_std): the env gets noisy translations, the recorded
    sample keeps the chunk the policy answered; the noise is reproducible per episode."""
    chunk = np.tile(np.asarray(NOOP_ACTION, np.float32), (8, 1))
    chunk[:, 0] = 0.95                             # near the bound: clipping must hold
    runner.config.action_noise_std = 0.2
    runner.record_samples = True
    try:
        first = run(runner, RecordingClient(chunk), max_steps=16)
        executed = np.stack(count_steps[10:])
        count_steps.clear()
        again = run(runner, RecordingClient(chunk), max_steps=16)
        replay = np.stack(count_steps[10:])
    finally:
        runner.config.action_noise_std = 0.0
        runner.record_samples = False
    assert executed.shape == (16, 7)
    np.testing.assert_array_equal(executed, replay)                           # reproducible per key
    np.testing.assert_array_equal(executed[:, 3:], np.tile(chunk[0, 3:], (16, 1)))   # rotation, gripper clean
    noise = executed[:, 1:3] - chunk[0, 1:3]
    assert 0.1 < noise.std() < 0.3 and executed[:, :3].max() <= 1.0 and executed[:, :3].min() >= -1.0
    for sample in first.samples + again.samples:
        np.testing.assert_array_equal(np.reshape(sample["action_chunk"], (8, 7)), chunk)
        assert sample["goal_offsets"] is None          # no privileged state in this run


def test_noop_times_out_at_exactly_the_suites_max_steps(runner):
    result = run(runner, RecordingClient())
    ep = result.episode
    assert ep["outcome"] == "timeout" and not ep["success"]
    assert ep["num_steps"] == MAX_STEPS["libero_spatial"] == 220
    assert ep["num_chunks"] == 28                # 27 full chunks + 4 actions of the 28th


def test_success_comes_from_the_envs_own_check(runner):
    result = run(runner, RecordingClient(), after_init=stage_bowl_on_plate)
    ep = result.episode
    assert ep["outcome"] == "success" and ep["success"]
    assert ep["num_steps"] == 1                  # detected on the first step of the first chunk
    assert runner.task_env.check_success()


@pytest.mark.parametrize("bad_chunk, message", [
    (np.where(np.arange(8)[:, None] == 3, np.nan, NOOP_CHUNK), "non-finite action"),
    (NOOP_CHUNK[:, :6], "shape"),
])
def test_bad_policy_output_is_an_error_record(runner, bad_chunk, message):
    result = run(runner, RecordingClient(bad_chunk), max_steps=40)
    ep = result.episode
    assert ep["outcome"] == "error" and not ep["success"]
    assert message in ep["error"] and "chunk 0" in ep["error"]
    assert ep["num_steps"] == 0


def test_env_crash_is_an_error_record_and_env_is_rebuilt(runner):
    def crash(env):
        raise RuntimeError("simulated MuJoCo failure")

    runner._env_for("libero_spatial", 0)
    built = runner.num_envs_built
    ep = run(runner, RecordingClient(), max_steps=8, after_init=crash).episode
    assert ep["outcome"] == "error" and "simulated MuJoCo failure" in ep["error"]
    ep = run(runner, RecordingClient(), max_steps=8).episode
    assert ep["outcome"] == "timeout" and runner.num_envs_built == built + 1


def test_layout_seed_gives_new_start_layouts_and_unset_keeps_the_older_runs():
    """Demonstration start states: each `init_layout_seed` shifts the objects differently around the
    same init state, reproducibly; unset gives the layouts every run recorded before the option
    had (pinned here from that code: runs/demos/s71 and its seed-74 repeat start from them)."""
    from rsd_ray.env.libero_env import LiberoTaskEnv, load_task

    env = LiberoTaskEnv(load_task("libero_spatial", 0), use_cameras=False, init_perturbation_m=0.015,
                        num_wait_steps=0)

    def object_xy(layout_seed, perturbation=0.015):
        env.init_layout_seed, env.init_perturbation_m = layout_seed, perturbation
        env.start_trial(3)
        sim = env.robosuite_env
        return np.stack([sim.sim.data.get_joint_qpos(obj.joints[-1])[:2].copy()
                         for name, obj in sorted(sim.objects_dict.items())
                         if name not in sim.fixtures_dict and obj.joints])

    try:
        unperturbed = object_xy(None, perturbation=0.0)
        legacy, seed75, seed75_again, seed76 = object_xy(None), object_xy(75), object_xy(75), object_xy(76)
    finally:
        env.close()
    # akita_black_bowl_1 and plate_1 of libero_spatial task 0, trial 3, before the option existed
    np.testing.assert_allclose(legacy[0], [-0.047589, 0.196003], atol=1e-6)
    np.testing.assert_allclose(legacy[4], [0.045111, 0.224807], atol=1e-6)
    np.testing.assert_array_equal(seed75, seed75_again)
    for layout in (seed75, seed76):
        shift = np.linalg.norm(layout - unperturbed, axis=1)
        assert np.all(shift > 1e-4) and np.all(shift < 0.1), shift      # every object moved, by cm
        assert np.abs(layout - legacy).min() > 1e-5                       # none where the old runs put it
    assert np.abs(seed75 - seed76).min() > 1e-5


def test_layout_seed_config_is_checked_and_kept_out_of_older_protocols():
    from rsd_ray.config import EvalConfig

    assert "init_layout_seed" not in EvalConfig(env=EnvConfig(init_perturbation_m=0.015)).protocol()
    with_seed = EvalConfig(env=EnvConfig(init_perturbation_m=0.015, init_layout_seed=75))
    assert with_seed.protocol()["init_layout_seed"] == 75
    with pytest.raises(ValueError, match="init_layout_seed=3 has no effect"):
        EnvConfig(init_layout_seed=3)
    for bad in (0, -1):   # numpy's SeedSequence([..., 0]) is SeedSequence([...]): 0 would repeat unset
        with pytest.raises(ValueError, match=f"init_layout_seed={bad}; expected >= 1"):
            EnvConfig(init_perturbation_m=0.015, init_layout_seed=bad)
