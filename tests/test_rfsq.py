"""RFSQ tokenizer: token grid, coarse-to-fine decoding, normalisation, checkpoints, training job.

A session fixture trains a small real tokenizer (hidden 64) on synthetic chunks for a few
hundred steps on one CPU thread; the shipped checkpoint is checked against the Done-when target.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train_rfsq import TrainRFSQConfig, load_chunks, train_rfsq
from rsd_ray.decoding.rfsq import (CHECKPOINT_FILES, ActionNormalizer, RFSQConfig, RFSQTokenizer,
                                   checkpoint_fingerprint, reconstruction_metrics)
from rsd_ray.decoding.synthetic_actions import synthetic_chunks

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "rfsq_synthetic"
HELD_OUT_SEED = 12345          # training uses seed 0: different episodes
ROUND_TRIP_MSE_TOL = 2e-3      # small fixture model, normalised units (shipped model: <= 1e-3)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[RFSQTokenizer, dict]:
    out_dir = tmp_path_factory.mktemp("rfsq") / "ckpt"
    config = TrainRFSQConfig(out_dir=str(out_dir), synthetic=2000, steps=250, batch_size=128, lr=3e-3,
                             warmup_steps=20, device="cpu", progress=False,
                             rfsq=RFSQConfig(hidden_dim=64))
    metrics = train_rfsq(config)
    return RFSQTokenizer.from_pretrained(out_dir), metrics


@pytest.fixture(scope="session")
def held_out() -> np.ndarray:
    return synthetic_chunks(256, seed=HELD_OUT_SEED)          # [N, T, A]


def test_tokens_are_BTDL_int64_in_range(trained, held_out):
    tok, _ = trained
    tokens = tok.encode(torch.as_tensor(held_out[:5]))
    assert tokens.shape == (5, 8, 16, 8)
    assert tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 7
    # With scale (V-1)**-l the residual of a layer spans the next layer's full range, so the
    # fine layers use every level (a wrong scale leaves the outer levels empty).
    assert set(tokens[..., 4:].unique().tolist()) == set(range(7))


def test_round_trip_within_tolerance(trained, held_out):
    tok, _ = trained
    raw = torch.as_tensor(held_out)
    decoded = tok.decode(tok.encode(raw))
    assert decoded.shape == raw.shape and decoded.dtype == torch.float32
    norm_err = tok.normalizer.normalize(decoded) - tok.normalizer.normalize(raw)
    assert norm_err.pow(2).mean() <= ROUND_TRIP_MSE_TOL
    # The gripper (-1/+1) must come back on the right side of 0.
    assert torch.equal(torch.sign(decoded[..., 6]), torch.sign(raw[..., 6]))


def test_error_falls_as_layers_are_added(trained, held_out):
    tok, metrics = trained
    for rows in (reconstruction_metrics(tok, held_out), metrics["val"]):
        mse = [row["mse_norm"] for row in rows]
        assert len(mse) == 8
        # Non-increasing; past ~5 layers the quantisation error (<= 6**-l in the latent) is far
        # below the autoencoder's own error, so only float noise is allowed there.
        for coarse, fine in zip(mse, mse[1:]):
            assert fine <= coarse * (1 + 1e-4) + 1e-10, mse
        assert mse[0] > 10 * mse[1] > 10 * mse[7], mse


def test_layer_scale_bounds_latent_error():
    tok = RFSQTokenizer(RFSQConfig())
    assert tok.config.layer_scales() == [6.0 ** -layer for layer in range(8)]
    latent = torch.rand(64, 8, 16, dtype=torch.float64) * 2 - 1           # [B, T, D] in [-1, 1)
    tokens = tok.quantize(latent)
    for num_layers in range(1, 9):
        err = (tok.codes_from_tokens(tokens, num_layers).double() - latent).abs().max()
        # 6**-l bound; float32 codes add ~1e-7.
        assert err <= 6.0 ** -num_layers + 2e-7, (num_layers, float(err))


def test_decode_accepts_only_first_layers_given(trained, held_out):
    tok, _ = trained
    tokens = tok.encode(held_out[:4])
    coarse = tok.decode(tokens[..., :3], num_layers=3)
    assert torch.equal(coarse, tok.decode(tokens, num_layers=3))
    assert not torch.equal(coarse, tok.decode(tokens))


def test_normalisation_inverts_exactly():
    train = synthetic_chunks(500, seed=1)
    norm = ActionNormalizer().fit(train)
    rows = train.reshape(-1, 7).astype(np.float64)
    np.testing.assert_allclose(norm.low.numpy()[:6], np.quantile(rows, 0.01, axis=0)[:6], rtol=1e-6)
    np.testing.assert_allclose(norm.high.numpy()[:6], np.quantile(rows, 0.99, axis=0)[:6], rtol=1e-6)
    low, high = norm.low.double(), norm.high.double()
    inside = torch.rand(1000, 7, dtype=torch.float64) * (high - low) + low
    inside[:, 6] = torch.where(torch.rand(1000) < 0.5, -1.0, 1.0).double()
    x_norm = norm.normalize(inside)
    assert x_norm.abs().max() <= 1.0
    torch.testing.assert_close(norm.unnormalize(x_norm), inside, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.unnormalize(norm.normalize(inside.float())), inside.float(), rtol=0, atol=1e-6)
    assert torch.equal(x_norm[:, 6], inside[:, 6])                        # gripper untouched
    outside = high + 0.5
    assert torch.equal(norm.normalize(outside.unsqueeze(0))[0, :6], torch.ones(6, dtype=torch.float64))


def test_save_load_is_bit_identical(trained, held_out, tmp_path):
    tok, _ = trained
    tok.save_pretrained(tmp_path / "a")
    loaded = RFSQTokenizer.from_pretrained(tmp_path / "a")
    assert loaded.config == tok.config
    state, loaded_state = tok.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    for name in ("low", "high", "mask"):
        assert torch.equal(getattr(tok.normalizer, name), getattr(loaded.normalizer, name))
    tokens = tok.encode(held_out)
    assert torch.equal(tokens, loaded.encode(held_out))
    for num_layers in (1, 8):
        assert torch.equal(tok.decode(tokens, num_layers), loaded.decode(tokens, num_layers))
    assert tok.fingerprint() == loaded.fingerprint() == loaded.loaded_fingerprint \
        == checkpoint_fingerprint(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    for name in CHECKPOINT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_wrong_shapes_give_clear_errors(trained):
    tok, _ = trained
    with pytest.raises(ValueError, match=r"\[2, 7, 8\].*\[B, T, A\] = \[B, 8, 7\]"):
        tok.encode(torch.zeros(2, 7, 8))
    with pytest.raises(ValueError, match=r"\[B, T, A\]"):
        tok.encode(torch.zeros(8, 7))
    tokens = tok.encode(torch.zeros(2, 8, 7))
    with pytest.raises(ValueError, match=r"\[2, 8, 8, 16\].*\[B, T, D, L\]"):
        tok.decode(tokens.permute(0, 1, 3, 2))                             # [B, T, L, D] mix-up
    with pytest.raises(ValueError, match="integer dtype"):
        tok.decode(tokens.float())
    with pytest.raises(ValueError, match=r"\[0, V\) = \[0, 7\)"):
        tok.decode(tokens + 1)
    with pytest.raises(ValueError, match="num_layers=9"):
        tok.decode(tokens, num_layers=9)
    with pytest.raises(ValueError, match=r"num_layers=4 to L=8"):
        tok.decode(tokens[..., :3], num_layers=4)


@pytest.fixture()
def saved(trained, tmp_path) -> Path:
    return trained[0].save_pretrained(tmp_path / "ckpt")


def test_missing_checkpoint_file(saved):
    (saved / "normalization.json").unlink()
    with pytest.raises(FileNotFoundError, match="normalization.json"):
        RFSQTokenizer.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RFSQTokenizer.from_pretrained(saved / "nope")


def test_truncated_safetensors(saved):
    blob = (saved / "model.safetensors").read_bytes()
    for cut in (4, len(blob) // 2, len(blob) - 10):
        (saved / "model.safetensors").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
            RFSQTokenizer.from_pretrained(saved)


def test_mismatched_config_field(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "latent_dim": 8}))
    with pytest.raises(ValueError, match=r"config\.json: field latent_dim=8 .*model\.safetensors.*latent_dim=16"):
        RFSQTokenizer.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**config, "num_levelz": 7}))
    with pytest.raises(ValueError, match="unknown RFSQConfig field.*num_levelz"):
        RFSQTokenizer.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field num_layers=8; the caller expects num_layers=4"):
        RFSQTokenizer.from_pretrained(saved, expect={"num_layers": 4})
    stats = json.loads((saved / "normalization.json").read_text())
    (saved / "normalization.json").write_text(json.dumps({**stats, "q01": stats["q01"][:6]}))
    with pytest.raises(ValueError, match=r"normalization\.json: field q01 has 6 entries"):
        RFSQTokenizer.from_pretrained(saved)


def test_straight_through_gradient_reaches_encoder():
    tok = RFSQTokenizer(RFSQConfig(hidden_dim=16))
    tok.normalizer.fit(synthetic_chunks(64, seed=2))
    losses = tok.reconstruction_losses(tok.normalizer.normalize(torch.as_tensor(synthetic_chunks(8, seed=3))))
    assert losses.shape == (8,)
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.encoder.parameters())


def test_training_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunks = synthetic_chunks(10, seed=4)
    np.save(tmp_path / "c.npy", chunks.reshape(10, 56))
    np.testing.assert_array_equal(load_chunks(TrainRFSQConfig(npy=str(tmp_path / "c.npy"))), chunks)
    table = pa.table({"episode_key": [f"k{i}" for i in range(10)],
                      "action_chunk": [row.tolist() for row in chunks]})      # T lists of A
    pq.write_table(table, tmp_path / "c.parquet")
    np.testing.assert_array_equal(load_chunks(TrainRFSQConfig(parquet=str(tmp_path / "c.parquet"))), chunks)
    with pytest.raises(ValueError, match="no column 'actions'.*episode_key, action_chunk"):
        load_chunks(TrainRFSQConfig(parquet=str(tmp_path / "c.parquet"), column="actions"))
    np.save(tmp_path / "bad.npy", chunks[:, :, :6])
    with pytest.raises(ValueError, match=r"\[10, 8, 6\].*\[N, 8, 7\]"):
        load_chunks(TrainRFSQConfig(npy=str(tmp_path / "bad.npy")))
    with pytest.raises(ValueError, match="exactly one of"):
        TrainRFSQConfig(npy="a.npy", synthetic=10)


def test_synthetic_chunks_are_seeded_and_libero_like():
    a, b = synthetic_chunks(300, seed=7), synthetic_chunks(300, seed=7)
    assert a.shape == (300, 8, 7) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthetic_chunks(300, seed=8))
    assert np.abs(a).max() <= 1.0
    assert set(np.unique(a[..., 6]).tolist()) == {-1.0, 1.0}
    # Smooth: consecutive steps differ far less than the signal itself.
    assert np.abs(np.diff(a[..., :6], axis=1)).mean() < 0.2 * np.abs(a[..., :6]).mean()


def test_shipped_checkpoint_meets_target():
    tok = RFSQTokenizer.from_pretrained(SHIPPED, expect={"chunk_steps": 8, "action_dim": 7, "latent_dim": 16,
                                                          "num_layers": 8, "num_levels": 7})
    mse = [row["mse_norm"] for row in reconstruction_metrics(tok, synthetic_chunks(512, seed=HELD_OUT_SEED))]
    assert mse[7] <= 1e-3, mse
    assert all(fine <= coarse * (1 + 1e-4) + 1e-10 for coarse, fine in zip(mse, mse[1:])), mse
