"""Motion feedback (rsd_ray/policy/motion_feedback.py): training and evaluation compute the same six
numbers from an episode's previous chunk, the policy's per-episode memory never leaks across
episodes or attempts, and speculative decoding stays exactly autoregressive with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd_ray.policy.base import Observation
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.motion_feedback import MOTION_FEEDBACK_DIM, feedback_for_samples, motion_feedback


def test_motion_feedback_is_commanded_mean_and_achieved_decimetres():
    chunk = np.zeros((8, 7))
    chunk[:, 2] = -0.5                       # down, every step
    chunk[:4, 0] = 1.0                       # +x for half the chunk
    got = motion_feedback(chunk.reshape(-1), np.array([0.1, 0.0, 1.2]), np.array([0.1, 0.01, 1.2]))
    np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0, 0.1, 0.0], atol=1e-6)   # stalled in z
    assert got.dtype == np.float32 and got.shape == (MOTION_FEEDBACK_DIM,)
    assert not motion_feedback(None, None, np.zeros(3)).any()


def test_feedback_for_samples_pairs_each_chunk_with_its_own_predecessor():
    """Rows out of order, two runs reusing one episode key, a chunk whose predecessor is missing
    (a takeover sample after the learner's chunk): each row reads only its own episode's chunk - 1."""
    rng = np.random.default_rng(0)
    ids = [("a", "s/0/0"), ("b", "s/0/0"), ("a", "s/0/0"), ("b", "s/0/0"), ("a", "s/0/0")]
    chunk_index = [1, 0, 0, 1, 3]
    proprio = rng.normal(size=(5, 8)).astype(np.float32)
    chunks = rng.uniform(-1, 1, size=(5, 56)).astype(np.float32)
    out = feedback_for_samples(ids, chunk_index, proprio, chunks)
    np.testing.assert_array_equal(out[0], motion_feedback(chunks[2], proprio[2, :3], proprio[0, :3]))
    np.testing.assert_array_equal(out[3], motion_feedback(chunks[1], proprio[1, :3], proprio[3, :3]))
    assert not out[[1, 2, 4]].any()          # first chunks, and chunk 3 without a chunk 2
    with pytest.raises(ValueError, match="two samples for episode"):
        feedback_for_samples([("a", "k"), ("a", "k")], [0, 0], proprio[:2], chunks[:2])


def test_config_refuses_other_feedback_widths():
    with pytest.raises(ValueError, match="motion_feedback_dim=3"):
        RSDConfig.tiny(motion_feedback_dim=3)
    assert RSDConfig.tiny(motion_feedback_dim=6).state_dim == 14


def _obs(key: str, chunk_index: int, eef: list[float]) -> Observation:
    rng = np.random.default_rng(chunk_index)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Observation(agentview=image, wrist=image[::-1].copy(), proprio=np.array(eef + [0, 0, 0, 0.04, -0.04], np.float32),
                       instruction="pick up the bowl", episode_key=key, chunk_index=chunk_index)


@pytest.fixture(scope="module")
def feedback_checkpoint(tmp_path_factory):
    from rsd_ray.policy.checkpoint import build_random_checkpoint, load_policy, save_policy
    config = RSDConfig.tiny(image_size=32, patch_size=16, motion_feedback_dim=MOTION_FEEDBACK_DIM)
    path = build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "fb", config, seed=0)
    # a trained model's feedback MLP is not zero: make this one matter, so memory bugs change outputs
    loaded = load_policy(path)
    torch.manual_seed(1)
    torch.nn.init.normal_(loaded.model.feedback_proj[-1].weight, std=0.5)
    return save_policy(path, loaded.model, loaded.draft, loaded.tokenizer, loaded.proprio)


def test_policy_feeds_back_its_previous_chunk_and_forgets_ended_episodes(feedback_checkpoint):
    from rsd_ray.policy.rsd_policy import RSDPolicy
    from rsd_ray.config import DecodeConfig

    policy = RSDPolicy.from_pretrained(feedback_checkpoint, DecodeConfig(mode="autoregressive"))
    state = lambda obs: policy.preprocess([obs])[3][0, 8:].numpy()        # noqa: E731
    first = _obs("s/0/0", 0, [0.0, 0.0, 1.2])
    assert not state(first).any()
    chunk0 = policy.predict([first, _obs("s/1/0", 0, [0.5, 0.5, 1.0])]).chunks[0]
    second = _obs("s/0/0", 1, [0.0, 0.02, 1.19])
    np.testing.assert_array_equal(state(second), motion_feedback(chunk0, first.proprio[:3], second.proprio[:3]))
    # a retry restarts the episode at chunk 0, and a chunk that skips one has no predecessor
    assert not state(_obs("s/0/0", 0, [0.0, 0.0, 1.2])).any()
    assert not state(_obs("s/0/0", 2, [0.0, 0.0, 1.2])).any()
    policy.end_episode("s/0/0")
    assert not state(second).any()


def test_speculative_exact_equals_autoregressive_with_feedback(feedback_checkpoint):
    """Two chunks per episode, batch of 3: the second chunk's prefix carries feedback, and the
    lossless mode still returns the autoregressive chunks bit for bit."""
    from rsd_ray.config import DecodeConfig
    from rsd_ray.policy.rsd_policy import RSDPolicy

    outputs = []
    for decode in (DecodeConfig(mode="autoregressive"),
                   DecodeConfig(mode="speculative", draft_layers=3, acceptance="exact")):
        policy = RSDPolicy.from_pretrained(feedback_checkpoint, decode)
        keys = ["s/0/0", "s/0/1", "s/1/0"]
        first = policy.predict([_obs(k, 0, [0.1 * i, 0.0, 1.2]) for i, k in enumerate(keys)]).chunks
        second = policy.predict([_obs(k, 1, [0.1 * i, 0.01, 1.15]) for i, k in enumerate(keys)]).chunks
        outputs.append((first, second))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    # the feedback reached the model: the same observation without a previous chunk decodes differently
    fresh = RSDPolicy.from_pretrained(feedback_checkpoint, DecodeConfig(mode="autoregressive"))
    alone = fresh.predict([_obs(k, 1, [0.1 * i, 0.01, 1.15]) for i, k in enumerate(["s/0/0", "s/0/1", "s/1/0"])])
    assert not np.array_equal(alone.chunks, outputs[0][1])
