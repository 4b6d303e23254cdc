"""RSD policy checkpoints: save/load round trip, Observation -> chunk end to end, clear errors."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rsd_ray.decoding.modes import DecodeSettings
from rsd_ray.policy.base import Observation
from rsd_ray.policy.checkpoint import build_random_checkpoint, load_backbone, load_policy
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.rsd_policy import RSDPolicy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "rsd_tiny", RSDConfig.tiny(), seed=0)


def observations(n: int) -> list[Observation]:
    rng = np.random.default_rng(0)
    return [Observation(agentview=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                        wrist=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                        proprio=rng.normal(size=8).astype(np.float32),
                        instruction=["pick up the black bowl and place it on the plate", "open the drawer"][i % 2],
                        episode_key=f"libero_spatial/0/{i}", chunk_index=0, seed=i) for i in range(n)]


@pytest.mark.parametrize("mode,passes", [("parallel", {1}), ("autoregressive", {8}), ("speculative", set(range(2, 9)))])
def test_predict_on_observations(checkpoint, mode, passes):
    policy = RSDPolicy.from_pretrained(checkpoint, DecodeSettings(mode=mode, draft_layers=3), device="cpu")
    out = policy.predict(observations(3))
    assert out.chunks.shape == (3, 8, 7) and out.chunks.dtype == np.float32
    assert np.isfinite(out.chunks).all()
    assert len(out.stats) == 3
    assert {s.num_main_passes for s in out.stats} <= passes
    assert all(s.batch_size == 3 and s.decode_ms > 0 and s.policy_ms >= s.step_ms for s in out.stats)
    if mode == "speculative":
        assert all(0 <= s.num_accepted_layers <= 3 and s.draft_ms > 0 for s in out.stats)
    else:
        assert all(s.num_accepted_layers == -1 for s in out.stats)
    assert policy.describe()["decoding_mode"] == mode and len(policy.describe()["checkpoint_hash"]) == 16


def test_round_trip_gives_identical_chunks(checkpoint, tmp_path):
    loaded = load_policy(checkpoint)
    again = tmp_path / "again"
    from rsd_ray.policy.checkpoint import save_policy
    save_policy(again, loaded.model, loaded.draft, loaded.tokenizer, loaded.proprio)
    a = RSDPolicy.from_pretrained(checkpoint, DecodeSettings(mode="speculative")).predict(observations(2))
    b = RSDPolicy.from_pretrained(again, DecodeSettings(mode="speculative")).predict(observations(2))
    np.testing.assert_array_equal(a.chunks, b.chunks)


def test_accepts_rsd_ray_decode_config(checkpoint):
    from rsd_ray.config import DecodeConfig
    policy = RSDPolicy.from_pretrained(checkpoint, DecodeConfig(mode="speculative", acceptance="threshold:0.5",
                                                                draft_layers=2), num_slots=4)
    assert policy.settings.draft_layers == 2 and policy.settings.num_slots == 4 and not policy.lossless


def test_missing_directory_and_files_are_clear_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RSDPolicy.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "draft.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="draft.safetensors"):
        load_policy(broken)
    shutil.rmtree(broken / "rfsq")
    shutil.copy(checkpoint / "draft.safetensors", broken / "draft.safetensors")
    with pytest.raises(FileNotFoundError, match="rfsq"):
        load_policy(broken)


def test_mismatched_config_is_a_clear_error(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    values = json.loads((bad / "rsd_config.json").read_text())
    values["hidden_size"] = 128
    values["num_attention_heads"] = 4
    (bad / "rsd_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"backbone/config.json: field hidden_size=64; rsd_config.json says hidden_size=128"):
        load_policy(bad)
    values["hidden_size"] = 64
    values["draft_hidden"] = 48
    (bad / "rsd_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"draft.safetensors: tensor \S+ has shape \[\d+, \d+\]; rsd_config.json implies"):
        load_policy(bad)
    values["draft_hidden"] = 32
    values["colour"] = "red"
    (bad / "rsd_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="unknown RSDConfig field"):
        load_policy(bad)


def test_average_of_fine_tunes_is_the_mean_of_their_weights_and_other_lineages_are_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from rsd_ray.policy.checkpoint import ProprioStats, average_policies, save_policy
    from rsd_ray.policy.draft import DraftModel
    from rsd_ray.policy.modeling_rsd import RSDModel

    base = load_policy(checkpoint)
    torch.manual_seed(1)                     # "a fine-tune": other weights, same tokenizer and normalisation
    other = save_policy(tmp_path / "other", RSDModel(base.config), DraftModel(base.config), base.tokenizer, base.proprio)
    average_policies([checkpoint, other], tmp_path / "soup")
    soup, b = load_policy(tmp_path / "soup"), load_policy(other)
    for module in ("model", "draft"):
        mine, theirs, averaged = (getattr(p, module).state_dict() for p in (base, b, soup))
        assert any(not torch.equal(mine[name], theirs[name]) for name in mine)   # else the mean proves nothing
        for name, value in averaged.items():
            assert torch.equal(value, (mine[name] + theirs[name]) / 2), name
    chunks = RSDPolicy.from_pretrained(tmp_path / "soup", DecodeSettings(mode="speculative")).predict(observations(2)).chunks
    assert chunks.shape == (2, 8, 7) and np.isfinite(chunks).all()

    with pytest.raises(FileExistsError, match="soup.* exists and is not empty"):
        average_policies([checkpoint, other], tmp_path / "soup")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from average_checkpoints import main
    made = main(["--out", str(tmp_path / "soup_script"), str(checkpoint), str(other)])
    training = json.loads((made / "training.json").read_text())
    assert [e["path"] for e in training["averaged_from"]] == [str(checkpoint), str(other)]
    assert training["command"].startswith("python scripts/average_checkpoints.py --out")
    assert load_file(made / "heads.safetensors").keys() == load_file(tmp_path / "soup" / "heads.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(made / "heads.safetensors").values(),
                                                 load_file(tmp_path / "soup" / "heads.safetensors").values()))
    with pytest.raises(ValueError, match="needs at least two"):
        average_policies([checkpoint], tmp_path / "one")
    save_policy(tmp_path / "other_proprio", b.model, b.draft, base.tokenizer, ProprioStats.identity(8))
    with pytest.raises(ValueError, match="other_proprio/proprio_normalization.json differs"):
        average_policies([checkpoint, tmp_path / "other_proprio"], tmp_path / "x")
    other_tokens = build_random_checkpoint(tmp_path / "other_tokens", RSDConfig.tiny(), seed=3)
    with pytest.raises(ValueError, match="other_tokens/rfsq is another RFSQ tokenizer"):
        average_policies([checkpoint, other_tokens], tmp_path / "y")
    bigger = build_random_checkpoint(tmp_path / "bigger", RSDConfig.tiny(draft_hidden=48), seed=0)
    with pytest.raises(ValueError, match="bigger/rsd_config.json differs"):
        average_policies([checkpoint, bigger], tmp_path / "z")


def test_any_llama_causal_lm_directory_is_a_backbone(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = RSDConfig.tiny()
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    lm.save_pretrained(tmp_path / "lm")
    backbone = load_backbone(tmp_path / "lm", cfg)
    torch.testing.assert_close(backbone.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        load_backbone(tmp_path / "lm", RSDConfig.tiny(num_hidden_layers=3))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(tmp_path)


def test_shipped_default_checkpoint_loads_and_speculation_is_exact():
    """The trained default (checkpoints/default_policy) loads without random weights, and its
    speculative chunks with exact acceptance equal its autoregressive ones."""
    from rsd_ray.config import DEFAULT_CHECKPOINT

    obs = observations(4)
    chunks = {}
    for mode in ("autoregressive", "speculative"):
        policy = RSDPolicy.from_pretrained(DEFAULT_CHECKPOINT, DecodeSettings(mode=mode, draft_layers=3), device="cpu")
        chunks[mode] = policy.predict(obs).chunks
    assert chunks["autoregressive"].shape == (4, 8, 7) and np.isfinite(chunks["autoregressive"]).all()
    np.testing.assert_array_equal(chunks["speculative"], chunks["autoregressive"])
