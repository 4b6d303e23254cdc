"""The RSD engine as the evaluator's policy: a real LIBERO episode end to end through Ray,
speculative decoding counters in the records, and training samples recorded."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rsd_ray.config import ClusterConfig, DecodeConfig, EnvConfig, EvalConfig, PolicyConfig, RecordsConfig
from rsd_ray.driver import run_eval
from rsd_ray.records.writer import read_samples, read_table

pytestmark = [pytest.mark.libero, pytest.mark.ray]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from rsd_ray.policy.checkpoint import build_random_checkpoint
    from rsd_ray.policy.configuration_rsd import RSDConfig

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_random_checkpoint(path, RSDConfig.tiny(), seed=0)
    return path


def test_speculative_rsd_policy_runs_a_libero_episode(ray_local, tiny_checkpoint, tmp_path):
    cfg = EvalConfig(
        env=EnvConfig(suite="libero_spatial", task_ids=[0], num_trials=1, max_steps=16),
        policy=PolicyConfig(kind="rsd", checkpoint=str(tiny_checkpoint), max_batch=4),
        decode=DecodeConfig(mode="speculative", draft_layers=3, acceptance="exact"),
        records=RecordsConfig(output_dir=str(tmp_path), run_name="rsd", record_samples="all"),
        cluster=ClusterConfig(num_env_actors=1, max_attempts=1, show_progress=False))
    summary = run_eval(cfg)
    episode = read_table(tmp_path / "rsd").to_pylist()[0]
    assert summary.num_error == 0, episode["error"]
    assert episode["outcome"] in ("timeout", "success") and episode["num_steps"] <= 16
    assert episode["decoding_mode"] == "speculative" and episode["acceptance"] == "exact" and episode["lossless"]
    assert episode["draft_layers"] == 3 and len(episode["checkpoint_hash"]) == 16
    chunks = read_table(tmp_path / "rsd", "chunks").to_pylist()
    assert len(chunks) == episode["num_chunks"] >= 1
    for c in chunks:
        assert 0 <= c["num_accepted_layers"] <= 3 and 2 <= c["num_main_passes"] <= 8
        assert c["policy_ms"] > 0 and c["decoding_mode"] == "speculative"
    samples = read_samples([tmp_path / "rsd"]).to_pylist()
    assert [s["chunk_index"] for s in samples] == list(range(episode["num_chunks"]))
    image = np.asarray(Image.open(io.BytesIO(samples[0]["agentview_png"])))
    assert image.shape == (224, 224, 3) and image.std() > 10
    assert len(samples[0]["action_chunk"]) == 56 and len(samples[0]["proprio"]) == 8
