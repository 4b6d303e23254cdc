"""jobs/train_policy.py end to end on a tiny synthetic samples dataset (SAMPLE_SCHEMA rows with
random images and synthetic action chunks): training lowers the loss, resume continues from
the saved step exactly, the checkpoint loads and predicts, and training and decoding agree on
the token layout [B, T, D, L]."""
from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from rsd_ray.decoding.rfsq import RFSQConfig
from rsd_ray.decoding.synthetic_actions import synthetic_chunks
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.records.writer import RecordWriter
from tests.fixtures_records import TASK_NAMES, SyntheticRun, episode_keys, write_run

NUM_TASKS, NUM_TRIALS, NUM_CHUNKS = 2, 3, 4          # 6 episodes, 24 samples


def tiny_model(**overrides) -> RSDConfig:
    base = dict(image_size=32, patch_size=16, vision_dim=16, max_instruction_tokens=32, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                initializer_range=0.05, draft_hidden=16)
    base.update(overrides)
    return RSDConfig.tiny(**base)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def square_image(x: int, y: int, rng) -> np.ndarray:
    """48x48 noise with a white 12x12 square at column x, row y: where a goal object would be."""
    image = rng.integers(0, 64, (48, 48, 3), dtype=np.uint8)
    image[y:y + 12, x:x + 12] = 255
    return image


def write_sample_run(root: Path, run_id: str = "demos", seed: int = 0, goal_offsets: bool = False,
                     square_camera: str = "agentview") -> Path:
    """A run directory with episode rows (all successes) and SAMPLE_SCHEMA samples. goal_offsets:
    each image of `square_camera` (agentview or wrist) shows a square whose position the sample's
    goal_offsets encode (learnable); the other camera shows noise."""
    spec = SyntheticRun(run_id, mode="autoregressive", num_tasks=NUM_TASKS, num_trials=NUM_TRIALS,
                        num_chunks=NUM_CHUNKS, success_prob=1.0, write_chunks=False, seed=seed)
    run_dir = write_run(root, spec)
    rng = np.random.default_rng(seed)
    keys = episode_keys(spec)
    chunks = synthetic_chunks(len(keys) * NUM_CHUNKS, seed=seed)              # [N, T, A]
    rows = []
    for e, key in enumerate(keys):
        suite, task, trial = key.split("/")
        for c in range(NUM_CHUNKS):
            x, y = (int(v) for v in rng.integers(0, 36, 2))
            agentview = square_image(x, y, rng) if goal_offsets else rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            offsets = [(x - 18) / 100, (y - 18) / 100, 0.05, 0.1, -0.1, 0.0] if goal_offsets else None
            wrist = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            if square_camera == "wrist":
                agentview, wrist = wrist, agentview
            rows.append({"run_id": run_id, "episode_key": key, "suite": suite, "task_id": int(task),
                         "trial": int(trial), "chunk_index": c, "step": 8 * c, "instruction": TASK_NAMES[int(task)],
                         "agentview_png": _png(agentview), "goal_offsets": offsets,
                         "wrist_png": _png(wrist),
                         "proprio": rng.normal(size=8).astype(np.float32).tolist(),
                         "action_chunk": chunks[e * NUM_CHUNKS + c].reshape(-1).tolist(),
                         "num_actions_executed": 8, "episode_success": True})
    RecordWriter(run_dir).write_samples(rows)
    return run_dir


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    return write_sample_run(tmp_path_factory.mktemp("samples"))


def train_config(sample_run: Path, tmp: Path, name: str, **overrides):
    from train_policy import TrainPolicyConfig
    base = dict(data=[str(sample_run)], out_dir=str(tmp / name / "ckpt"), work_dir=str(tmp / name / "work"),
                results_prefix=str(tmp / name / "curve"), model=tiny_model(),
                rfsq=RFSQConfig(hidden_dim=32, num_hidden_layers=1), rfsq_steps=40, rfsq_batch_size=64,
                steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=10, save_every=10, shift_px=1,
                draft_steps=20, draft_batch_size=16, val_fraction=0.2, progress=False)
    base.update(overrides)
    return TrainPolicyConfig(**base)


def base_and_grown(run: Path, tmp: Path, grown_model: RSDConfig):
    """A tiny checkpoint trained 5 steps, and the same fine-tuned at lr 0 into `grown_model` (which
    adds modules): both loaded as policies, for a grown model's start to be compared with its base."""
    from train_policy import train_policy

    from rsd_ray.policy.checkpoint import load_policy

    base = train_policy(train_config(run, tmp, "base", steps=5, draft_steps=3))
    grown = train_policy(train_config(run, tmp, "grown", init_from=base["checkpoint"], steps=2, lr=0.0,
                                      draft_steps=2, draft_lr=0.0, model=grown_model))
    return load_policy(base["checkpoint"]), load_policy(grown["checkpoint"])


def test_train_resume_and_load(sample_run, tmp_path):
    from train_policy import STATE_FILE, train_policy

    from rsd_ray.policy.base import Observation
    from rsd_ray.policy.rsd_policy import RSDPolicy

    # uninterrupted reference: 30 main steps, then the draft
    full = train_policy(train_config(sample_run, tmp_path, "full"))
    ce = [h["train_ce"] for h in full["history"]]
    assert len(ce) == 30
    assert np.mean(ce[-5:]) < np.mean(ce[:5]) - 0.05, ce
    assert full["num_samples"] == NUM_TASKS * NUM_TRIALS * NUM_CHUNKS
    assert full["num_val_rows"] > 0 and full["num_val_rows"] % NUM_CHUNKS == 0    # split by episode
    assert full["draft_history"][-1]["draft_ce"] < full["draft_history"][0]["draft_ce"]
    assert Path(str(tmp_path / "full" / "curve") + ".png").stat().st_size > 0
    # the checkpoint carries the weights of the lowest weighted val CE, not the last step's
    evals = [h for h in full["history"] if "val_loss" in h]
    assert [h["step"] for h in evals] == [10, 20, 30]
    assert full["final"]["weights_from_step"] == min(evals, key=lambda h: h["val_loss"])["step"]
    with pytest.raises(ValueError, match="layer_weights"):
        train_config(sample_run, tmp_path, "bad", layer_weights=[1.0, 1.0])

    # interrupted: max_minutes=0 stops the main phase after its first step (state saved)
    part = train_config(sample_run, tmp_path, "resumed", max_minutes=0.0, on_max_minutes="stop")
    first = train_policy(part)
    assert first["checkpoint"] is None and first["final"]["stopped_early"]
    state = torch.load(tmp_path / "resumed" / "work" / STATE_FILE, weights_only=False)
    assert state["step"] == 1 and state["phase"] == "main"
    with pytest.raises(FileExistsError, match="--resume=true"):
        train_policy(part)
    resumed = train_policy(replace(part, max_minutes=None, resume=True))
    assert [h["step"] for h in resumed["history"]] == list(range(1, 31))
    # per-step seeded batches + restored optimizer: the resumed run is the uninterrupted one
    assert [h["train_ce"] for h in resumed["history"]] == pytest.approx(ce, abs=1e-5)

    policy = RSDPolicy.from_pretrained(resumed["checkpoint"], decode_config=None)
    rng = np.random.default_rng(1)
    obs = [Observation(agentview=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                       wrist=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                       proprio=rng.normal(size=8).astype(np.float32), instruction=TASK_NAMES[b],
                       episode_key=f"libero_spatial/{b}/0", chunk_index=0) for b in range(2)]
    out = policy.predict(obs)
    assert out.chunks.shape == (2, 8, 7) and np.isfinite(out.chunks).all()
    text = (Path(resumed["checkpoint"]) / "README.md").read_text()
    assert resumed["data_fingerprint"] in text
    assert (Path(resumed["checkpoint"]) / "training.json").is_file()


def test_init_from_keeps_tokenizer_proprio_and_weights(sample_run, tmp_path):
    """--init_from: the fine-tuned run starts from the checkpoint's weights, tokenizer and proprio
    normalisation (lr 0 proves the weights were loaded: the result equals the start bit for bit),
    records how the start was trained, and refuses a different model shape or a missing dir."""
    from train_policy import train_policy

    from rsd_ray.policy.checkpoint import load_policy

    base = train_policy(train_config(sample_run, tmp_path, "base", steps=5, draft_steps=3), command="base-cmd")
    other = write_sample_run(tmp_path / "other_data", run_id="more", seed=5)
    tuned = train_policy(train_config(other, tmp_path, "tuned", init_from=base["checkpoint"], steps=3, lr=0.0,
                                      draft_steps=2, draft_lr=0.0, data=[str(sample_run), str(other)]),
                         command="tune-cmd")
    # two runs over the same episode keys are twice the episodes
    assert tuned["num_episodes"] == 2 * base["num_episodes"] == 2 * NUM_TASKS * NUM_TRIALS
    assert tuned["rfsq_fingerprint"] == base["rfsq_fingerprint"]
    assert tuned["init_lineage"][0]["command"] == "base-cmd"
    # an average of the two keeps both sources in the lineage of what is fine-tuned from it
    from rsd_ray.policy.checkpoint import average_policies
    soup = tmp_path / "soup"
    average_policies([base["checkpoint"], tuned["checkpoint"]], soup)
    (soup / "training.json").write_text(json.dumps({"command": "soup-cmd", "averaged_from": [
        {"path": "base", "training": {"command": "base-cmd"}}, {"path": "tuned", "training": {"command": "tune-cmd"}}]}))
    from_soup = train_policy(train_config(other, tmp_path, "from_soup", init_from=str(soup), steps=1, lr=0.0,
                                          draft_steps=1, draft_lr=0.0), command="soup-tune-cmd")
    assert [s["training"]["command"] for s in from_soup["init_lineage"][0]["averaged_from"]] == ["base-cmd", "tune-cmd"]
    assert "averaged from `tuned`, trained by `tune-cmd`" in (Path(from_soup["checkpoint"]) / "README.md").read_text()
    assert tuned["data_fingerprint"] != base["data_fingerprint"]
    a, b = load_policy(base["checkpoint"]), load_policy(tuned["checkpoint"])
    assert a.proprio == b.proprio
    for (name, x), (_, y) in zip(list(a.model.state_dict().items()) + list(a.draft.state_dict().items()),
                                 list(b.model.state_dict().items()) + list(b.draft.state_dict().items())):
        assert torch.equal(x, y), name
    assert "base-cmd" in (Path(tuned["checkpoint"]) / "README.md").read_text()
    with pytest.raises(ValueError, match="hidden_size: ours 64, checkpoint 32"):
        train_policy(train_config(other, tmp_path, "wide", init_from=base["checkpoint"], model=tiny_model(hidden_size=64)))
    with pytest.raises(FileNotFoundError, match="init_from="):
        train_policy(train_config(other, tmp_path, "missing", init_from=str(tmp_path / "nope")))


def test_init_from_grows_a_conv_stem_that_starts_at_zero(sample_run, tmp_path):
    """A checkpoint without the CNN stem fine-tunes into a model with one (conv_stem_channels): the
    grown model predicts exactly what the checkpoint did until the stem learns, and the stem does
    get gradients (its zero last conv is not a dead end)."""
    from rsd_ray.policy.modeling_rsd import RSDModel

    grown_config = tiny_model(conv_stem_channels=8)
    a, b = base_and_grown(sample_run, tmp_path, grown_config)
    assert b.config.conv_stem_channels == 8 and b.model.vision.stem is not None
    images = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    assert torch.equal(a.model.vision(images), b.model.vision(images))
    model = RSDModel(grown_config)
    model.vision(images).square().sum().backward()
    assert model.vision.stem[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        tiny_model(conv_stem_channels=8, patch_size=12, image_size=36)


def test_agentview_crop_zooms_camera_0_and_fine_tunes_from_an_uncropped_checkpoint(sample_run, tmp_path):
    """--model.agentview_crop: training and RSDPolicy show the model the same cropped agentview
    (the wrist frame untouched), an uncropped checkpoint fine-tunes with it (weights carried over,
    lr 0 keeps them), the crop round-trips through the checkpoint, and a box that is not
    0 <= top < bottom <= 1, 0 <= left < right <= 1 is refused."""
    from train_policy import train_policy

    from rsd_ray.policy.base import Observation
    from rsd_ray.policy.checkpoint import load_policy, read_config
    from rsd_ray.policy.modeling_rsd import preprocess_images
    from rsd_ray.policy.rsd_policy import RSDPolicy

    rng = np.random.default_rng(3)
    agentview, wrist = (rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2))
    box = (0.25, 0.0, 0.75, 0.5)                            # rows 12..36, columns 0..24 of 48
    frames = [torch.from_numpy(agentview), torch.from_numpy(wrist)]
    cropped = preprocess_images(frames, 32, num_cameras=2, agentview_crop=box)
    whole = preprocess_images(frames, 32)
    assert torch.equal(cropped[1], whole[1]) and not torch.equal(cropped[0], whole[0])
    assert torch.equal(cropped[0], preprocess_images([torch.from_numpy(agentview[12:36, :24].copy())], 32)[0])

    base = train_policy(train_config(sample_run, tmp_path, "base", steps=5, draft_steps=3))
    zoomed = train_policy(train_config(sample_run, tmp_path, "zoomed", init_from=base["checkpoint"], steps=2, lr=0.0,
                                       draft_steps=2, draft_lr=0.0, model=tiny_model(agentview_crop=list(box))))
    assert read_config(zoomed["checkpoint"]).agentview_crop == box
    assert "agentview cropped to rows 0.25-0.75, columns 0-0.5" in (Path(zoomed["checkpoint"]) / "README.md").read_text()
    a, b = load_policy(base["checkpoint"]), load_policy(zoomed["checkpoint"])
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    policy = RSDPolicy.from_pretrained(zoomed["checkpoint"])
    observation = Observation(agentview=agentview, wrist=wrist, proprio=np.zeros(8, np.float32),
                              instruction=TASK_NAMES[0], episode_key="libero_spatial/0/0", chunk_index=0, seed=0)
    assert torch.equal(policy.preprocess([observation])[0][0], cropped)
    assert policy.describe()["model_config"]["agentview_crop"] == box
    for bad in ([0.5, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.2], [0.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match="agentview_crop="):
            tiny_model(agentview_crop=bad)


def test_init_from_grows_motion_feedback_that_starts_at_zero(sample_run, tmp_path):
    """--model.motion_feedback_dim=6 on a checkpoint without it: the grown model's prefix equals the
    checkpoint's whatever the feedback says, training builds the feedback from the samples (chunk
    0 of each episode zeros, later chunks not), and the feedback MLP gets gradients."""
    from rsd_ray.policy.modeling_rsd import RSDModel, tokenize_instructions
    from rsd_ray.policy.training import build_demo_tensors, sort_samples
    from rsd_ray.records.writer import read_samples

    grown_config = tiny_model(motion_feedback_dim=6)
    a, b = base_and_grown(sample_run, tmp_path, grown_config)
    assert b.config.motion_feedback_dim == 6 and b.model.feedback_proj is not None
    images = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    ids, mask = tokenize_instructions(["a", "b", "c"], 32)
    proprio, feedback = torch.randn(3, 8), torch.randn(3, 6)
    with torch.no_grad():
        ours, _ = b.model.encode_prefix(images, ids, mask, torch.cat([proprio, feedback], dim=1))
        theirs, _ = a.model.encode_prefix(images, ids, mask, proprio)
    assert torch.equal(ours, theirs)
    table = sort_samples(read_samples([sample_run]))
    demos = build_demo_tensors(table, grown_config, b.tokenizer, b.proprio)
    first = torch.tensor(table.column("chunk_index").to_pylist()) == 0
    assert demos.proprio.shape == (table.num_rows, 14)
    assert not demos.proprio[first, 8:].any() and demos.proprio[~first, 8:].abs().sum(dim=1).gt(0).all()
    model = RSDModel(grown_config)
    model.encode_prefix(images, ids, mask, torch.cat([proprio, feedback], dim=1))[0].square().sum().backward()
    assert model.feedback_proj[-1].weight.grad.abs().sum() > 0


def test_teacher_forcing_matches_autoregressive_layout():
    """A random model: feeding its own autoregressive tokens back as the gold tokens, the
    teacher-forced argmax of every layer is those tokens (same positions, mask, embeddings)."""
    from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
    from rsd_ray.policy.draft import DraftModel
    from rsd_ray.policy.modeling_rsd import RSDModel, tokenize_instructions
    from rsd_ray.policy.training import draft_teacher_forced_logits, teacher_forced_logits

    torch.manual_seed(0)
    config = tiny_model(initializer_range=0.2)
    model, draft = RSDModel(config).eval(), DraftModel(config).eval()
    B = 3
    images = torch.rand(B, 2, 3, 32, 32) * 2 - 1
    ids, mask = tokenize_instructions([TASK_NAMES[0], TASK_NAMES[1], "x"], config.max_instruction_tokens)
    proprio = torch.randn(B, 8)
    with torch.no_grad():
        prefix, pmask = model.encode_prefix(images, ids, mask, proprio)
        ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=4)).run(prefix, pmask).tokens
        logits, h0 = teacher_forced_logits(model, images, ids, mask, proprio, ar)
        assert logits.shape == (B, 8, 16, 8, 7)
        assert torch.equal(logits.argmax(-1), ar)
        proposed, _ = draft.propose(h0, 3)
        assert torch.equal(draft_teacher_forced_logits(draft, h0, proposed).argmax(-1), proposed)


def test_overfit_reproduces_tokens_autoregressively(tmp_path):
    """Trained to overfit 4 samples, greedy autoregressive decoding returns their RFSQ tokens."""
    from train_policy import train_policy

    from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
    from rsd_ray.policy.checkpoint import load_policy
    from rsd_ray.policy.training import build_demo_tensors, sort_samples
    from rsd_ray.records.writer import read_samples
    import pyarrow.compute as pc

    run = write_sample_run(tmp_path / "data", seed=3)
    table = read_samples([run])
    table = table.filter(pc.equal(table.column("episode_key"), "libero_spatial/0/0"))   # 4 samples
    small = tmp_path / "small"
    spec_dir = write_run(small, SyntheticRun("one", mode="autoregressive", num_tasks=1, num_trials=1,
                                             num_chunks=NUM_CHUNKS, success_prob=1.0, write_chunks=False))
    RecordWriter(spec_dir).write_samples(table.to_pylist())
    config = train_config(spec_dir, tmp_path, "overfit", model=tiny_model(hidden_size=64, intermediate_size=128),
                          steps=150, batch_size=4, lr=1e-2, warmup_steps=5, shift_px=0, val_fraction=0.0,
                          weight_decay=0.0, draft_steps=1, eval_every=50, save_every=200, layer_weights=None)
    result = train_policy(config)
    loaded = load_policy(result["checkpoint"])
    demos = build_demo_tensors(sort_samples(read_samples([spec_dir])), loaded.config, loaded.tokenizer, loaded.proprio)
    images, ids, mask, proprio, gold = demos.batch(torch.arange(len(demos)))
    with torch.no_grad():
        prefix, pmask = loaded.model.encode_prefix(images, ids, mask, proprio)
        tokens = DecodeEngine(loaded.model, None, DecodeSettings(mode="autoregressive", num_slots=4)).run(prefix, pmask).tokens
    assert tokens.shape == gold.shape == (4, 8, 16, 8)
    assert (tokens == gold).float().mean() > 0.99, (tokens == gold).float().mean(dim=(0, 1, 2))


def test_collect_demos_config():
    """collect_demos records only successful episodes, with cameras, from perturbed starts."""
    from collect_demos import CollectDemosConfig

    from rsd_ray.config import EvalConfig

    config = CollectDemosConfig(suites=["libero_spatial", "libero_object"], task_ids=[0, 1], first_trial=10,
                                num_trials=5, init_perturbation_m=0.02, action_noise_std=0.2, output_dir="out")
    ev = config.eval_config("libero_object")
    assert ev.env.action_noise_std == 0.2 and ev.protocol()["action_noise_std"] == 0.2
    # runs without the option keep the protocol they had before it existed (still comparable)
    assert "action_noise_std" not in EvalConfig().protocol()
    assert ev.records.record_samples == "success" and ev.env.cameras == "on" and ev.policy.kind == "expert"
    assert (ev.env.suite, ev.env.task_ids, ev.env.first_trial, ev.env.num_trials) == ("libero_object", [0, 1], 10, 5)
    assert ev.env.init_perturbation_m == 0.02 and ev.run_name == "demos-libero_object"
    assert ev.env.init_layout_seed is None and "init_layout_seed" not in ev.protocol()
    seeded = CollectDemosConfig(layout_seed=75).eval_config("libero_spatial")
    assert seeded.env.init_layout_seed == 75 and seeded.protocol()["init_layout_seed"] == 75
    with pytest.raises(ValueError, match="layout_seed=0; expected >= 1"):
        CollectDemosConfig(layout_seed=0)
    with pytest.raises(ValueError, match="init_perturbation_m=0"):
        CollectDemosConfig(init_perturbation_m=0.0)
    with pytest.raises(ValueError, match="not a LIBERO suite"):
        CollectDemosConfig(suites=["libero-10"])


def test_one_model_flag_keeps_the_other_default_model_values():
    """`--model.conv_stem_channels=32` changes that field only: the rest of the model stays
    default_model()'s (draccus alone would rebuild `model` from RSDConfig's class defaults)."""
    from train_policy import TrainPolicyConfig, default_model

    from jobs.cli import parse_config

    plain = parse_config(TrainPolicyConfig, ["--data=[runs/x]"])
    grown = parse_config(TrainPolicyConfig, ["--data=[runs/x]", "--model.conv_stem_channels=32",
                                             "--model.hidden_size=64"])
    assert plain.model == default_model()
    assert grown.model == replace(default_model(), conv_stem_channels=32, hidden_size=64)
    assert grown.model.patch_size == 8 != RSDConfig().patch_size


def test_ema_weights_are_validated_shipped_and_resumed(sample_run, tmp_path):
    """--ema_decay: the checkpoint carries the moving average (not the last raw weights), the
    validation rows score the average, and a resumed run reproduces the uninterrupted average."""
    from train_policy import STATE_FILE, ema_model, train_policy

    from rsd_ray.policy.checkpoint import load_policy
    from rsd_ray.policy.modeling_rsd import RSDModel

    full = train_policy(train_config(sample_run, tmp_path, "ema", ema_decay=0.9, keep_best=False, draft_steps=2))
    state = torch.load(tmp_path / "ema" / "work" / STATE_FILE, weights_only=False)
    shipped = load_policy(full["checkpoint"]).model.state_dict()
    assert state["ema"] is not None
    # the same run without the average ships other weights: the raw ones
    plain = train_policy(train_config(sample_run, tmp_path, "plain", keep_best=False, draft_steps=2))
    raw = load_policy(plain["checkpoint"]).model.state_dict()
    assert any(not torch.equal(raw[k], shipped[k]) for k in shipped)
    assert [h["train_ce"] for h in plain["history"]] == [h["train_ce"] for h in full["history"]]
    averaged = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    moved = [k for k in shipped if k in averaged and not torch.equal(shipped[k], averaged[k])]
    assert not moved, moved
    assert "exponential moving average" in (Path(full["checkpoint"]) / "README.md").read_text()

    # the same run stopped after one step and resumed ends with the same averaged weights
    part = train_config(sample_run, tmp_path, "ema_resumed", ema_decay=0.9, keep_best=False, draft_steps=2,
                        max_minutes=0.0, on_max_minutes="stop")
    train_policy(part)
    resumed = train_policy(replace(part, max_minutes=None, resume=True))
    again = load_policy(resumed["checkpoint"]).model.state_dict()
    for k, v in shipped.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="ema_decay"):
        train_config(sample_run, tmp_path, "bad", ema_decay=1.0)

    # the decay ramps up: after the first update the average is the model, then it lags behind it
    torch.manual_seed(0)
    model = RSDModel(tiny_model())
    ema = ema_model(model, 0.99)
    ema.update_parameters(model)
    assert torch.equal(ema.module.head.weight, model.head.weight)
    start = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ema.update_parameters(model)
    # second update: weight 1 - min(0.99, 2/11) of the new value
    torch.testing.assert_close(ema.module.head.weight, start + (1 - 2 / 11))


def test_pooled_instruction_prefix(sample_run, tmp_path):
    """instruction_pool_tokens=k: the prefix holds k instruction positions (all attended), the
    pooled tokens depend on the bytes and their order but not on the padding, speculative exact
    equals autoregressive on such a model, and a checkpoint of one trains, saves and loads."""
    from train_policy import train_policy

    from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings
    from rsd_ray.policy.checkpoint import load_policy
    from rsd_ray.policy.draft import DraftModel
    from rsd_ray.policy.modeling_rsd import RSDModel, tokenize_instructions

    config = tiny_model(instruction_pool_tokens=2, initializer_range=0.2)
    assert config.prefix_length == 2 * 4 + 1 + 2
    torch.manual_seed(0)
    model, draft = RSDModel(config).eval(), DraftModel(config).eval()
    assert model.instruction_embed is None
    texts = ["put the bowl on the plate", "put the plate on the bowl", "put the bowl on the plate", ""]
    ids, mask = tokenize_instructions(texts, config.max_instruction_tokens)
    ids[2, mask[2].sum():] = 99           # garbage behind the mask changes nothing
    images = (torch.rand(1, 2, 3, 32, 32) * 2 - 1).expand(4, -1, -1, -1, -1)
    proprio = torch.zeros(4, 8)
    with torch.no_grad():
        prefix, pmask = model.encode_prefix(images, ids, mask, proprio)
        assert prefix.shape == (4, config.prefix_length, 32) and pmask.all()
        words = prefix[:, -2:]
        assert not torch.allclose(words[0], words[1])          # order matters
        torch.testing.assert_close(words[0], words[2])
        assert torch.isfinite(words[3]).all()                  # an empty instruction
        ar = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=4)).run(prefix, pmask).tokens
        sp = DecodeEngine(model, draft, DecodeSettings(mode="speculative", num_slots=4, draft_layers=3)
                          ).run(prefix, pmask).tokens
    assert torch.equal(ar, sp)

    trained = train_policy(train_config(sample_run, tmp_path, "pooled", model=tiny_model(instruction_pool_tokens=2),
                                        steps=5, draft_steps=2))
    loaded = load_policy(trained["checkpoint"])
    assert loaded.config.instruction_pool_tokens == 2 and loaded.model.instruction_pool is not None
    # --init_from a checkpoint that reads bytes: the pooler replaces its byte embedding, and with lr 0
    # every other weight is the checkpoint's
    base = train_policy(train_config(sample_run, tmp_path, "bytes", steps=3, draft_steps=2))
    moved = train_policy(train_config(sample_run, tmp_path, "bytes_pooled", init_from=base["checkpoint"], steps=2,
                                      lr=0.0, draft_steps=2, draft_lr=0.0, model=tiny_model(instruction_pool_tokens=2)))
    a, b = load_policy(base["checkpoint"]).model.state_dict(), load_policy(moved["checkpoint"]).model.state_dict()
    assert "instruction_embed.weight" in a and "instruction_embed.weight" not in b
    assert any(k.startswith("instruction_pool.") for k in b)
    for k, v in a.items():
        if k != "instruction_embed.weight":
            assert torch.equal(v, b[k]), k
    with pytest.raises(ValueError, match="instruction_pool_tokens=-1"):
        tiny_model(instruction_pool_tokens=-1)


def test_replace_tasks_from_supersedes_those_tasks_only(sample_run, tmp_path):
    """Tasks present in replace_tasks_from come from those runs alone; the other tasks of --data stay."""
    import pyarrow.compute as pc
    from train_policy import load_samples

    from rsd_ray.records.writer import read_samples

    newer = write_sample_run(tmp_path / "newer", run_id="newer", seed=9)
    table = read_samples([newer])
    only_task1 = tmp_path / "task1"
    run_dir = write_run(only_task1, SyntheticRun("task1", mode="autoregressive", num_tasks=NUM_TASKS,
                                                 num_trials=NUM_TRIALS, num_chunks=NUM_CHUNKS, success_prob=1.0,
                                                 write_chunks=False))
    RecordWriter(run_dir).write_samples(table.filter(pc.equal(table.column("task_id"), 1)).to_pylist())
    mixed = load_samples([str(sample_run)], [str(run_dir)])
    runs = {(r, t) for r, t in zip(mixed.column("run_id").to_pylist(), mixed.column("task_id").to_pylist())}
    assert runs == {("demos", 0), ("newer", 1)}
    assert mixed.num_rows == NUM_TASKS * NUM_TRIALS * NUM_CHUNKS
    assert load_samples([str(sample_run)], []).num_rows == mixed.num_rows


def test_goal_offset_loss_skips_unlabelled_rows():
    from rsd_ray.policy.training import GoalOffsetHead, goal_offset_loss

    head = GoalOffsetHead(8)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    offsets = torch.tensor([[0.1] * 6, [float("nan")] * 6, [0.2] * 6])
    loss, n = goal_offset_loss(head, (hidden,), offsets)
    expected = torch.nn.functional.mse_loss(head(hidden[[0, 2]]), offsets[[0, 2]] / 0.1)
    assert n == 2 and torch.allclose(loss, expected)
    none, n = goal_offset_loss(head, (hidden,), torch.full((3, 6), float("nan")))
    assert n == 0 and float(none.detach()) == 0.0
    none.backward()                                   # an all-unlabelled batch still steps


def test_goal_offset_auxiliary_loss_learns_and_resumes(tmp_path):
    """goal_offset_weight > 0: the readout learns where the square is (train MSE falls, val error
    is reported), the head is part of the resumable state, and data without labels is refused."""
    from train_policy import train_policy

    labelled = write_sample_run(tmp_path / "labelled", run_id="labelled", seed=3, goal_offsets=True)
    common = dict(goal_offset_weight=1.0, steps=120, eval_every=60, save_every=60, draft_steps=2, lr=3e-3)
    full = train_policy(train_config(labelled, tmp_path, "aux", **common))
    mse = [h["train_offset_mse"] for h in full["history"]]
    assert np.mean(mse[-20:]) < 0.3 * np.mean(mse[:20]), mse
    assert all("val_object_xy_rmse_cm" in h for h in full["history"] if "val_ce" in h)
    part = train_config(labelled, tmp_path, "aux_resumed", max_minutes=0.0, on_max_minutes="stop", **common)
    train_policy(part)
    resumed = train_policy(replace(part, max_minutes=None, resume=True))
    assert [h["train_offset_mse"] for h in resumed["history"]] == pytest.approx(mse, abs=1e-5)
    unlabelled = write_sample_run(tmp_path / "unlabelled", run_id="unlabelled")
    with pytest.raises(ValueError, match="no training sample .* has goal_offsets"):
        train_policy(train_config(unlabelled, tmp_path, "aux_none", **common))


def test_camera_dropout_blanks_only_the_chosen_camera_at_its_rate(sample_run, tmp_path):
    """--camera_dropout=[0, p]: the wrist image of about p of the rows is blank (0, mid grey), the
    agentview never; the same generator draws the same rows (resume draws what an uninterrupted run
    would); a list that is not one probability in [0, 1) per camera is refused; training applies it."""
    from train_policy import train_policy

    from rsd_ray.policy.training import drop_cameras

    images = torch.rand(4000, 2, 3, 4, 4) * 2 - 1
    out = drop_cameras(images, [0.0, 0.3], torch.Generator().manual_seed(1))
    blank = out.flatten(2).eq(0).all(dim=2)                                  # [B, C]
    assert not blank[:, 0].any() and torch.equal(out[:, 0], images[:, 0])
    assert 0.27 < blank[:, 1].float().mean() < 0.33
    assert torch.equal(out[~blank[:, 1], 1], images[~blank[:, 1], 1])
    assert torch.equal(out, drop_cameras(images, [0.0, 0.3], torch.Generator().manual_seed(1)))
    for bad in ([0.5], [0.0, 1.0], [-0.1, 0.2]):
        with pytest.raises(ValueError, match="camera_dropout="):
            train_config(sample_run, tmp_path, "bad", camera_dropout=bad)
    # the training loop applies it: same seed and batches, a different first-step loss than without it
    plain = train_policy(train_config(sample_run, tmp_path, "plain", steps=2, draft_steps=2))
    dropped = train_policy(train_config(sample_run, tmp_path, "dropout", steps=2, draft_steps=2,
                                        camera_dropout=[0.0, 0.9]))
    assert dropped["history"][0]["train_ce"] != pytest.approx(plain["history"][0]["train_ce"], rel=1e-6)
    assert dropped["config"]["camera_dropout"] == [0.0, 0.9]


def test_per_camera_shift_moves_only_the_chosen_camera_within_its_range(sample_run, tmp_path):
    """--shift_px_per_camera=[0, r]: the agentview is never moved (the keypoints' object regression
    reads its geometry), each wrist image is one of the (2r+1)^2 edge-replicated translations and
    all of them occur; an int range still moves both cameras; a wrong list is refused; training
    applies it."""
    import torch.nn.functional as F
    from train_policy import train_policy

    from rsd_ray.policy.training import random_shift

    images = torch.rand(600, 2, 3, 8, 8)
    out = random_shift(images, [0, 2], torch.Generator().manual_seed(3))
    assert torch.equal(out[:, 0], images[:, 0])
    padded = F.pad(images[:, 1], (2,) * 4, mode="replicate")
    seen = set()
    for row in range(len(images)):
        matches = [(y, x) for y in range(5) for x in range(5)
                   if torch.equal(out[row, 1], padded[row, :, y:y + 8, x:x + 8])]
        assert matches, f"row {row}: the wrist image is not a translation within 2 px"
        seen.update(matches)
    assert len(seen) == 25
    gen = torch.Generator().manual_seed(3)                # no range: no draw, so later draws (dropout) stay put
    assert random_shift(images, [0, 0], gen) is images and torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())
    both = random_shift(images, 2, torch.Generator().manual_seed(3))
    assert not torch.equal(both[:, 0], images[:, 0]) and not torch.equal(both[:, 1], images[:, 1])
    for bad in ([3], [0, -1], [1, 2, 3]):
        with pytest.raises(ValueError, match="shift_px_per_camera="):
            train_config(sample_run, tmp_path, "bad", shift_px_per_camera=bad)
    plain = train_policy(train_config(sample_run, tmp_path, "plain", steps=2, draft_steps=2, shift_px=0))
    shifted = train_policy(train_config(sample_run, tmp_path, "shifted", steps=2, draft_steps=2, shift_px=0,
                                        shift_px_per_camera=[0, 3]))
    assert shifted["history"][0]["train_ce"] != pytest.approx(plain["history"][0]["train_ce"], rel=1e-6)


def test_keypoints_grow_from_zero_and_learn_where_the_square_is(tmp_path):
    """--model.keypoints=K on a checkpoint without them: the grown model's prefix is exactly the
    checkpoint's (zero last layer) and the keypoint CNN gets gradients; with
    --goal_offset_source=keypoints the agentview keypoints (with proprio and instruction) learn where
    the square is (train MSE falls to a third, held-out xy error well below an image-blind
    readout's), and asking for that source without keypoints is refused."""
    from train_policy import train_policy

    from rsd_ray.policy.modeling_rsd import RSDModel, tokenize_instructions

    labelled = write_sample_run(tmp_path / "labelled", run_id="labelled", seed=5, goal_offsets=True)
    grown_config = tiny_model(keypoints=4)
    a, b = base_and_grown(labelled, tmp_path, grown_config)
    assert b.config.keypoints == 4 and b.model.keypoints is not None
    images = torch.rand(3, 2, 3, 32, 32) * 2 - 1
    ids, mask = tokenize_instructions(["pick", "place", ""], 32)
    proprio = torch.randn(3, 8)
    assert torch.equal(a.model.encode_prefix(images, ids, mask, proprio)[0],
                       b.model.encode_prefix(images, ids, mask, proprio)[0])
    keypoints = b.model.keypoints(images)
    assert keypoints.shape == (3, 2, 4, 2) and keypoints.abs().max() <= 1.0
    model = RSDModel(grown_config)
    model.keypoint_proj[-1].weight.data.normal_()
    model.encode_prefix(images, ids, mask, proprio)[0].square().sum().backward()
    assert model.keypoints.features[0].weight.grad.abs().sum() > 0

    aux = train_policy(train_config(labelled, tmp_path, "aux", model=grown_config, goal_offset_weight=1.0,
                                    goal_offset_source="keypoints", shift_px=0, steps=150, eval_every=75,
                                    save_every=75, draft_steps=2, lr=3e-3))
    mse = [h["train_offset_mse"] for h in aux["history"]]
    assert np.mean(mse[-20:]) < 0.33 * np.mean(mse[:20]), mse
    # on held-out episodes too: the square's xy is uniform over +-18 cm per axis, so a readout that
    # ignores the image (the mean) is ~15 cm off; the keypoints get it to ~4 cm
    val_rmse = [h["val_object_xy_rmse_cm"] for h in aux["history"] if "val_ce" in h]
    assert len(val_rmse) == 2 and val_rmse[-1] < 8.0, val_rmse
    with pytest.raises(ValueError, match="goal_offset_source=keypoints needs a model with keypoints"):
        train_config(labelled, tmp_path, "aux_no_keypoints", goal_offset_weight=1.0, goal_offset_source="keypoints")


def test_wrist_keypoint_head_reads_the_wrist_camera_alone(tmp_path):
    """--goal_offset_source=keypoints+wrist adds a head on the wrist camera's keypoints: with the
    square shown to the wrist camera only, the wrist head locates it (held-out xy error well below an
    image-blind readout's ~15 cm) while the agentview head, reading noise, cannot; so each head reads
    its own camera and the loss reaches the shared keypoint CNN through the wrist images."""
    from train_policy import train_policy

    from rsd_ray.policy.training import KeypointOffsetHead, PerCameraOffsetHeads, goal_offset_loss

    wrist_run = write_sample_run(tmp_path / "wrist", run_id="wrist", seed=5, goal_offsets=True, square_camera="wrist")
    model = tiny_model(keypoints=4)
    run = train_policy(train_config(wrist_run, tmp_path, "aux_wrist", model=model, goal_offset_weight=1.0,
                                    goal_offset_source="keypoints+wrist", shift_px=0, steps=150, eval_every=75,
                                    save_every=75, draft_steps=2, lr=3e-3))
    last = [h for h in run["history"] if "val_ce" in h][-1]
    assert last["val_wrist_object_xy_rmse_cm"] < 8.0 < last["val_object_xy_rmse_cm"], last
    # each prediction is regressed to the same label: a perfect wrist half and a zero agentview
    # half give half the zero readout's loss
    offsets = torch.tensor([[0.1, -0.2, 0.05, 0.0, 0.3, 0.0]])
    both = torch.cat([torch.zeros(1, 6), offsets / 0.1], dim=1)
    loss, n = goal_offset_loss(lambda x: x, (both,), offsets)
    assert n == 1 and float(loss) == pytest.approx(float((offsets / 0.1).square().mean()) / 2)
    instructions = torch.zeros(1, 4, dtype=torch.long)
    heads = PerCameraOffsetHeads([KeypointOffsetHead(2, 8, instructions), KeypointOffsetHead(2, 8, instructions, camera=1)])
    keypoints, proprio = torch.rand(3, 2, 2), torch.randn(3, 8)
    out = heads(keypoints, proprio, instructions.expand(3, -1), keypoints.flip(0), proprio, instructions.expand(3, -1))
    assert out.shape == (3, 12) and torch.equal(out[:, 6:], heads.heads[1](keypoints.flip(0), proprio, instructions.expand(3, -1)))
    with pytest.raises(ValueError, match="needs the wrist camera"):
        train_config(wrist_run, tmp_path, "aux_one_camera", model=tiny_model(keypoints=4, num_cameras=1),
                     goal_offset_weight=1.0, goal_offset_source="keypoints+wrist")


def test_keypoint_offset_head_tells_instructions_apart_and_refuses_unknown_ones():
    """Which black bowl is the goal depends on the instruction alone: the same keypoints and proprio
    under two instructions of the data give two readouts; an instruction the data lacks is an error,
    not a silent fallback to another instruction's embedding."""
    from rsd_ray.policy.modeling_rsd import tokenize_instructions
    from rsd_ray.policy.training import KeypointOffsetHead

    known, _ = tokenize_instructions(["pick the bowl next to the plate", "pick the bowl on the stove"], 40)
    head = KeypointOffsetHead(num_keypoints=4, proprio_dim=8, instructions=torch.unique(known, dim=0))
    keypoints, proprio = torch.rand(1, 4, 2).expand(2, -1, -1), torch.randn(1, 8).expand(2, -1)
    out = head(keypoints, proprio, known)
    assert out.shape == (2, 6) and not torch.allclose(out[0], out[1])
    unknown, _ = tokenize_instructions(["pick the bowl on the cabinet"], 40)
    with pytest.raises(ValueError, match="not among the training data"):
        head(keypoints[:1], proprio[:1], unknown)
