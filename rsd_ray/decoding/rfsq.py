"""RFSQ action tokenizer: an 8-step action chunk <-> a [T, D, L] grid of integers in [0, V).

Pipeline (shapes per chunk; B chunks in a batch):

    raw chunk [T, A]  --ActionNormalizer-->  [T, A] in [-1, 1]
      --encoder (per-step MLP), tanh-->      latent [T, D] in (-1, 1)
      --residual FSQ, L rfsq_layers-->       tokens [T, D, L] int64 in [0, V)
    tokens[..., :l]  --sum of scaled codes-->  latent [T, D]  --decoder-->  [T, A] in [-1, 1]
      --ActionNormalizer.unnormalize-->      raw chunk [T, A]

Residual FSQ. Every rfsq_layer is a V-level scalar quantiser per latent dim (V odd) on the grid
{-1, -(h-1)/h, ..., 0, ..., 1} with h = (V - 1) / 2. rfsq_layer 0 quantises the tanh-bounded
latent; its error lies in [-1/(V-1), 1/(V-1)]. rfsq_layer l quantises what layers < l left over,
divided by the scale s_l = (V - 1) ** -l, so that residual again spans exactly [-1, 1] and every
level is used. The latent error after l rfsq_layers is therefore at most (V - 1) ** -l (6**-l
for V=7): each added layer shrinks it six-fold, which is what makes decoding from the first l
layers a coarse-to-fine approximation. Token = level + h, so tokens lie in [0, V).

Why not vector-quantize-pytorch's ResidualFSQ (1.32.0, pinned in constraints.txt): (1) its FSQ
packs all D dims of a layer into one int32 index (basis cumprod(levels) overflows int32 for
7**16) and, with return_indices, eagerly builds a prod(levels) = 7**16 entry codebook; we need
one token per latent dim; (2) its per-layer scale is levels ** -l (7**-l), while a 7-level
layer leaves a residual of +-1/6 of its scale, so the next layer sees +-7/6 and its hard clamp
cuts the tails: the layers do not tile and the error bound above does not hold. The few lines
below do residual FSQ with a straight-through estimator instead; tests pin the scale.

Tokens are [B, T, D, L] everywhere in rsd_ray; this module is the only place that reorders
axes. Normalisation follows OpenVLA-OFT's BOUNDS_Q99 convention: per-dim 1st/99th percentiles
of the training chunks map to [-1, 1] with clipping, except the gripper, which passes through
unchanged because LIBERO's action space already has it at -1 (open) / +1 (close).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS, LATENT_DIM, NUM_LEVELS, NUM_RFSQ_LAYERS
from rsd_ray.decoding.state_check import check_state_dict

CHECKPOINT_FORMAT = "rsd_ray.rfsq/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZATION_FILE = "normalization.json"
CHECKPOINT_FILES: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE, NORMALIZATION_FILE)
_METADATA_KEY = "rsd_ray_rfsq"   # safetensors metadata: {"format": ..., "config": {...}}

# Spans below this are treated as constant dims (OpenVLA-OFT adds 1e-8 to the span instead;
# a floor keeps normalize/unnormalize exact inverses of each other).
_MIN_SPAN = 1e-8


@dataclass(frozen=True)
class RFSQConfig:
    """What an RFSQ tokenizer is; everything here is saved in config.json."""

    chunk_steps: int = CHUNK_STEPS          # T
    action_dim: int = ACTION_DIM            # A
    latent_dim: int = LATENT_DIM            # D
    num_layers: int = NUM_RFSQ_LAYERS       # L: rfsq_layers
    num_levels: int = NUM_LEVELS            # V: levels per latent dim and rfsq_layer (odd)
    hidden_dim: int = 128                   # width of the encoder's and decoder's MLPs
    num_hidden_layers: int = 2              # hidden Linear+GELU blocks in each MLP
    gripper_dims: tuple[int, ...] = (ACTION_DIM - 1,)   # action dims left unnormalised

    def __post_init__(self) -> None:
        for name in ("chunk_steps", "action_dim", "latent_dim", "num_layers", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"rfsq.{name}={value!r}; expected a positive integer")
        if not isinstance(self.num_hidden_layers, int) or self.num_hidden_layers < 0:
            raise ValueError(f"rfsq.num_hidden_layers={self.num_hidden_layers!r}; expected an integer >= 0")
        # Odd V puts a level at 0 and makes the residual of a layer exactly +-1/(V-1): the
        # tiling argument in the module docstring needs both.
        if not isinstance(self.num_levels, int) or self.num_levels < 3 or self.num_levels % 2 == 0:
            raise ValueError(f"rfsq.num_levels={self.num_levels!r}; expected an odd integer >= 3")
        dims = tuple(self.gripper_dims)
        object.__setattr__(self, "gripper_dims", dims)
        if len(set(dims)) != len(dims) or any(not 0 <= d < self.action_dim for d in dims):
            raise ValueError(f"rfsq.gripper_dims={dims}; expected distinct action dims in "
                             f"0..{self.action_dim - 1} (rfsq.action_dim={self.action_dim})")

    @property
    def half_levels(self) -> int:
        """h = (V - 1) / 2: levels run over -h..h."""
        return (self.num_levels - 1) // 2

    def layer_scales(self) -> list[float]:
        """s_l = (V - 1) ** -l for l in 0..L-1: the scale of rfsq_layer l's codes."""
        return [float(self.num_levels - 1) ** -layer for layer in range(self.num_layers)]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gripper_dims"] = list(self.gripper_dims)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "RFSQConfig":
        """Strict: an unknown or missing field is an error naming `source` and the field."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown RFSQConfig field(s) {', '.join(unknown)}; "
                             f"expected only {', '.join(names)}")
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{source}: missing RFSQConfig field(s) {', '.join(missing)}")
        kwargs = dict(values)
        if not isinstance(kwargs["gripper_dims"], (list, tuple)):
            raise ValueError(f"{source}: field gripper_dims={kwargs['gripper_dims']!r}; expected a list of ints")
        kwargs["gripper_dims"] = tuple(kwargs["gripper_dims"])
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


class ActionNormalizer(nn.Module):
    """Per-dim q01/q99 bounds -> [-1, 1] (OpenVLA-OFT's BOUNDS_Q99), gripper dims passed through.

    normalize clips to [-1, 1], so values outside the training percentiles (2 % of the
    training rows per dim) come back at the bound: that clipping is the only loss here.
    unnormalize does not clip; for x within [low, high] it inverts normalize up to float
    rounding. The statistics are buffers that are not in the state dict: they are saved in
    normalization.json next to the weights, readable by people.
    """

    def __init__(self, action_dim: int = ACTION_DIM, gripper_dims: tuple[int, ...] = (ACTION_DIM - 1,)):
        super().__init__()
        mask = torch.ones(action_dim, dtype=torch.bool)
        mask[list(gripper_dims)] = False
        self.register_buffer("low", -torch.ones(action_dim), persistent=False)    # [A] q01
        self.register_buffer("high", torch.ones(action_dim), persistent=False)    # [A] q99
        self.register_buffer("mask", mask, persistent=False)                      # [A] True = normalised
        self.num_fit_rows = 0
        self.fitted = False

    @property
    def action_dim(self) -> int:
        return int(self.low.shape[0])

    def fit(self, chunks: Tensor | np.ndarray) -> "ActionNormalizer":
        """chunks: [N, T, A] (or [N, A]) raw training actions; sets low/high to q01/q99 per dim."""
        rows = np.asarray(chunks.detach().cpu() if isinstance(chunks, Tensor) else chunks, dtype=np.float64)
        if rows.ndim < 2 or rows.shape[-1] != self.action_dim or rows.size == 0:
            raise ValueError(f"ActionNormalizer.fit got shape {list(rows.shape)}; expected [N, T, A] "
                             f"or [N, A] with A={self.action_dim} and N > 0")
        rows = rows.reshape(-1, self.action_dim)
        if not np.all(np.isfinite(rows)):
            raise ValueError("ActionNormalizer.fit got non-finite actions")
        low, high = np.quantile(rows, [0.01, 0.99], axis=0)
        mask = self.mask.cpu().numpy()
        # Gripper dims keep the identity bounds so that the saved stats say what is done.
        low = np.where(mask, low, -1.0)
        high = np.where(mask, high, 1.0)
        self.low.copy_(torch.as_tensor(low, dtype=torch.float32))
        self.high.copy_(torch.as_tensor(high, dtype=torch.float32))
        self.num_fit_rows = int(rows.shape[0])
        self.fitted = True
        return self

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        low = self.low.to(device=like.device, dtype=like.dtype)
        span = (self.high.to(device=like.device, dtype=like.dtype) - low).clamp_min(_MIN_SPAN)
        return low, span, self.mask.to(like.device)

    def normalize(self, actions: Tensor) -> Tensor:
        """actions: [..., A] raw -> [..., A] in [-1, 1] on normalised dims (clipped)."""
        low, span, mask = self._stats(actions)
        scaled = (2.0 * (actions - low) / span - 1.0).clamp(-1.0, 1.0)
        return torch.where(mask, scaled, actions)

    def unnormalize(self, actions: Tensor) -> Tensor:
        """actions: [..., A] normalised -> [..., A] raw units (no clipping)."""
        low, span, mask = self._stats(actions)
        raw = (actions + 1.0) * span / 2.0 + low
        return torch.where(mask, raw, actions)

    def to_json_dict(self) -> dict[str, Any]:
        # float32 -> Python float is exact and json writes the shortest round-tripping repr,
        # so the stats survive save/load bit for bit.
        return {
            "convention": "bounds_q99: x_norm = clip(2 * (x - q01) / (q99 - q01) - 1, -1, 1) where "
                          "normalized_mask, else x unchanged (gripper)",
            "q01": [float(v) for v in self.low.cpu()],
            "q99": [float(v) for v in self.high.cpu()],
            "normalized_mask": [bool(v) for v in self.mask.cpu()],
            "num_fit_rows": self.num_fit_rows,
        }

    def load_json_dict(self, values: Mapping[str, Any], source: str) -> None:
        for key in ("q01", "q99", "normalized_mask", "num_fit_rows"):
            if key not in values:
                raise ValueError(f"{source}: missing field {key}")
        stats = {}
        for key in ("q01", "q99", "normalized_mask"):
            seq = values[key]
            if not isinstance(seq, list) or len(seq) != self.action_dim:
                got = len(seq) if isinstance(seq, list) else type(seq).__name__
                raise ValueError(f"{source}: field {key} has {got} entries; expected a list of "
                                 f"action_dim={self.action_dim}")
            stats[key] = seq
        low = torch.tensor(stats["q01"], dtype=torch.float32)
        high = torch.tensor(stats["q99"], dtype=torch.float32)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()) or (high < low).any():
            raise ValueError(f"{source}: fields q01/q99 must be finite with q99 >= q01; got "
                             f"q01={stats['q01']}, q99={stats['q99']}")
        mask = torch.tensor([bool(v) for v in stats["normalized_mask"]])
        if not torch.equal(mask, self.mask.cpu()):
            raise ValueError(f"{source}: field normalized_mask={mask.tolist()} does not match "
                             f"config.json gripper_dims (expects {self.mask.tolist()})")
        self.low.copy_(low)
        self.high.copy_(high)
        self.num_fit_rows = int(values["num_fit_rows"])
        self.fitted = True


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_hidden_layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(num_hidden_layers):
        blocks += [nn.Linear(width, hidden_dim), nn.GELU()]
        width = hidden_dim
    blocks.append(nn.Linear(width, out_dim))
    return nn.Sequential(*blocks)


class RFSQTokenizer(nn.Module):
    """Action chunks <-> RFSQ tokens. See the module docstring for the scheme.

    The encoder and decoder act on each of the T steps alone (shared weights), so token
    [t, :, :] describes action t: a policy's block position t predicts exactly its own step.
    """

    def __init__(self, config: RFSQConfig | None = None):
        super().__init__()
        self.config = config or RFSQConfig()
        c = self.config
        self.normalizer = ActionNormalizer(c.action_dim, c.gripper_dims)
        self.encoder = _mlp(c.action_dim, c.hidden_dim, c.latent_dim, c.num_hidden_layers)
        self.decoder = _mlp(c.latent_dim, c.hidden_dim, c.action_dim, c.num_hidden_layers)
        # float64 so that the residual of rfsq_layer 7 (~6**-8) is far above rounding noise.
        self.register_buffer("layer_scales", torch.tensor(c.layer_scales(), dtype=torch.float64),
                             persistent=False)  # [L]
        self._loaded_fingerprint: str | None = None

    # ----------------------------------------------------------------- shape checks
    @property
    def device(self) -> torch.device:
        return self.layer_scales.device

    def _check_chunks(self, chunks: Tensor | np.ndarray, what: str) -> Tensor:
        c = self.config
        chunks = torch.as_tensor(chunks)
        expected = (c.chunk_steps, c.action_dim)
        if chunks.ndim != 3 or tuple(chunks.shape[1:]) != expected:
            raise ValueError(f"{what}: chunks of shape {list(chunks.shape)}; expected [B, T, A] = "
                             f"[B, {c.chunk_steps}, {c.action_dim}]")
        if not chunks.is_floating_point():
            raise ValueError(f"{what}: chunks of dtype {chunks.dtype}; expected a float tensor")
        return chunks.to(device=self.device, dtype=torch.float32)

    def _check_num_layers(self, num_layers: int | None, what: str) -> int:
        num_rfsq_layers = self.config.num_layers
        if num_layers is None:
            return num_rfsq_layers
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= num_rfsq_layers:
            raise ValueError(f"{what}: num_layers={num_layers!r}; expected an int in 1..L={num_rfsq_layers}")
        return num_layers

    def _check_tokens(self, tokens: Tensor, num_layers: int, what: str) -> Tensor:
        c = self.config
        tokens = torch.as_tensor(tokens)
        ok = (tokens.ndim == 4 and tuple(tokens.shape[1:3]) == (c.chunk_steps, c.latent_dim)
              and num_layers <= tokens.shape[3] <= c.num_layers)
        if not ok:
            raise ValueError(f"{what}: tokens of shape {list(tokens.shape)}; expected [B, T, D, L] = "
                             f"[B, {c.chunk_steps}, {c.latent_dim}, {c.num_layers}] (a last dim from "
                             f"num_layers={num_layers} to L={c.num_layers} is accepted)")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"{what}: tokens of dtype {tokens.dtype}; expected an integer dtype (int64)")
        if tokens.numel():
            low, high = (int(v) for v in torch.aminmax(tokens))
            if low < 0 or high >= c.num_levels:
                raise ValueError(f"{what}: token values span [{low}, {high}]; expected integers in "
                                 f"[0, V) = [0, {c.num_levels})")
        return tokens.to(self.device)

    # ----------------------------------------------------------------- the scheme
    def latent(self, chunks_norm: Tensor) -> Tensor:
        """chunks_norm: [B, T, A] normalised -> [B, T, D] bounded latent in (-1, 1)."""
        return torch.tanh(self.encoder(chunks_norm))

    def quantize(self, latent: Tensor) -> Tensor:
        """latent: [B, T, D] in [-1, 1] -> tokens [B, T, D, L] int64 in [0, V)."""
        h = self.config.half_levels
        residual = latent.detach().to(torch.float64)
        levels = []
        for scale in self.layer_scales:
            level = torch.round(residual / scale * h).clamp(-h, h)   # [B, T, D] in -h..h
            levels.append(level)
            residual = residual - level / h * scale
        return (torch.stack(levels, dim=-1) + h).to(torch.int64)

    def codes_from_tokens(self, tokens: Tensor, num_layers: int | None = None) -> Tensor:
        """tokens: [B, T, D, L'] int, L' >= num_layers -> latent [B, T, D] float32: the sum of the
        first num_layers rfsq_layers' scaled codes."""
        n = self._check_num_layers(num_layers, "codes_from_tokens")
        tokens = self._check_tokens(tokens, n, "codes_from_tokens")
        return self._codes(tokens, n)

    def _codes(self, tokens: Tensor, num_layers: int) -> Tensor:
        h = self.config.half_levels
        codes = (tokens[..., :num_layers].to(torch.float64) - h) / h        # [B, T, D, l]
        return (codes * self.layer_scales[:num_layers]).sum(dim=-1).to(torch.float32)

    def _partial_latents(self, latent: Tensor) -> Tensor:
        """latent: [B, T, D] -> [L, B, T, D]: entry l is the sum of rfsq_layers 0..l's codes."""
        tokens = self.quantize(latent)
        return torch.stack([self._codes(tokens, n) for n in range(1, self.config.num_layers + 1)])

    # ----------------------------------------------------------------- public API
    @torch.no_grad()
    def encode(self, chunks: Tensor | np.ndarray) -> Tensor:
        """chunks: [B, T, A] raw action units -> tokens [B, T, D, L] int64 in [0, V)."""
        chunks = self._check_chunks(chunks, "RFSQTokenizer.encode")
        return self.quantize(self.latent(self.normalizer.normalize(chunks)))

    @torch.no_grad()
    def decode_normalized(self, tokens: Tensor, num_layers: int | None = None) -> Tensor:
        """tokens: [B, T, D, L'] -> chunks [B, T, A] in normalised units, clamped to [-1, 1]."""
        n = self._check_num_layers(num_layers, "RFSQTokenizer.decode")
        tokens = self._check_tokens(tokens, n, "RFSQTokenizer.decode")
        # Clamped because the encoder only ever saw [-1, 1]: this keeps every decoded action
        # within the training data's q01/q99 range.
        return self.decoder(self._codes(tokens, n)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, tokens: Tensor, num_layers: int | None = None) -> Tensor:
        """tokens: [B, T, D, L] int in [0, V) -> chunks [B, T, A] float32 in raw action units,
        decoded from the first num_layers rfsq_layers only (default L; 1 = coarsest). A last
        token dim between num_layers and L is accepted (e.g. only K draft layers). The gripper
        comes back continuous in [-1, 1]; binarising it is the policy processor's job."""
        return self.normalizer.unnormalize(self.decode_normalized(tokens, num_layers))

    def reconstruction_losses(self, chunks_norm: Tensor) -> Tensor:
        """chunks_norm: [B, T, A] normalised -> [L] MSE of decoding from the first 1..L layers.

        Differentiable: the straight-through estimator passes the gradient of each quantised
        latent to the continuous latent unchanged.
        """
        latent = self.latent(chunks_norm)                                    # [B, T, D]
        partial = self._partial_latents(latent)                               # [L, B, T, D]
        quantized = latent.unsqueeze(0) + (partial - latent.unsqueeze(0)).detach()
        recon = self.decoder(quantized)                                       # [L, B, T, A]
        return (recon - chunks_norm.unsqueeze(0)).pow(2).mean(dim=(1, 2, 3))

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_bytes(self) -> dict[str, bytes]:
        """What save_pretrained writes, file name -> exact bytes."""
        from safetensors.torch import save as save_safetensors

        config_dict = self.config.to_dict()
        config_json = json.dumps({"format": CHECKPOINT_FORMAT, **config_dict}, indent=2, sort_keys=True) + "\n"
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        # One metadata key: safetensors writes a metadata map in hash order, so several keys
        # would make the bytes (and the fingerprint) differ from save to save.
        metadata = json.dumps({"format": CHECKPOINT_FORMAT, "config": config_dict}, sort_keys=True)
        weights = save_safetensors(tensors, metadata={_METADATA_KEY: metadata})
        stats = json.dumps(self.normalizer.to_json_dict(), indent=2) + "\n"
        return {CONFIG_FILE: config_json.encode(), WEIGHTS_FILE: weights, NORMALIZATION_FILE: stats.encode()}

    def fingerprint(self) -> str:
        """sha256 of the checkpoint files this tokenizer would write (equal to
        checkpoint_fingerprint(dir) of its save_pretrained dir). Goes into run records."""
        return _fingerprint_bytes(self._checkpoint_bytes())

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json, model.safetensors, normalization.json into directory `path`."""
        if not self.normalizer.fitted:
            raise ValueError("RFSQTokenizer.save_pretrained: the normaliser was never fitted; call "
                             "tok.normalizer.fit(train_chunks) (or train with jobs/train_rfsq.py) first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, blob in self._checkpoint_bytes().items():
            tmp = path / (name + ".tmp")
            tmp.write_bytes(blob)
            tmp.replace(path / name)   # a crash mid-write leaves the old file, not a truncated one
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None,
                        map_location: str | torch.device = "cpu") -> "RFSQTokenizer":
        """Load a save_pretrained directory. `expect` names config fields the caller relies on
        (e.g. {"num_layers": 8}); a mismatch is an error naming the field."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"RFSQ checkpoint directory {str(path)!r} does not exist; expected a "
                                    f"directory with {', '.join(CHECKPOINT_FILES)} (RFSQTokenizer.save_pretrained)")
        blobs = {}
        for name in CHECKPOINT_FILES:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(f"RFSQ checkpoint {str(path)!r} has no {name}; expected "
                                        f"{', '.join(CHECKPOINT_FILES)}")
            blobs[name] = file.read_bytes()

        config_path = str(path / CONFIG_FILE)
        config_dict = _parse_json(blobs[CONFIG_FILE], config_path)
        fmt = config_dict.pop("format", None)
        if fmt != CHECKPOINT_FORMAT:
            raise ValueError(f"{config_path}: field format={fmt!r}; expected {CHECKPOINT_FORMAT!r}")
        config = RFSQConfig.from_dict(config_dict, source=config_path)
        for name, wanted in (expect or {}).items():
            if not hasattr(config, name):
                raise ValueError(f"from_pretrained(expect=...): {name!r} is not an RFSQConfig field")
            got = getattr(config, name)
            if got != (tuple(wanted) if isinstance(wanted, list) else wanted):
                raise ValueError(f"{config_path}: field {name}={got!r}; the caller expects {name}={wanted!r}")

        weights_path = str(path / WEIGHTS_FILE)
        saved = _safetensors_metadata(blobs[WEIGHTS_FILE], weights_path)["config"]
        for name, value in config.to_dict().items():
            if saved.get(name) != value:
                raise ValueError(f"{config_path}: field {name}={value!r} does not match {weights_path}, "
                                 f"which was saved with {name}={saved.get(name)!r}")
        try:
            from safetensors.torch import load as load_safetensors
            tensors = load_safetensors(blobs[WEIGHTS_FILE])
        except Exception as err:  # safetensors raises its own error type for corrupt data
            raise ValueError(f"{weights_path}: not a readable safetensors file ({err}); it may be "
                             f"truncated, re-save the checkpoint") from err

        tok = cls(config)
        check_state_dict(weights_path, tensors, tok.state_dict(), "config.json",
                         fields="latent_dim, action_dim, hidden_dim, num_hidden_layers")
        tok.load_state_dict(tensors, strict=True)
        norm_path = str(path / NORMALIZATION_FILE)
        tok.normalizer.load_json_dict(_parse_json(blobs[NORMALIZATION_FILE], norm_path), norm_path)
        tok._loaded_fingerprint = _fingerprint_bytes(blobs)
        return tok.to(map_location).eval()

    @property
    def loaded_fingerprint(self) -> str | None:
        """fingerprint of the files this tokenizer was loaded from (None if built in code)."""
        return self._loaded_fingerprint


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over a checkpoint directory's files (names and bytes, fixed order)."""
    path = Path(path)
    blobs = {}
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"RFSQ checkpoint {str(path)!r} has no {name}")
        blobs[name] = (path / name).read_bytes()
    return _fingerprint_bytes(blobs)


def _fingerprint_bytes(blobs: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        blob = blobs[name]
        digest.update(f"{name}\0{len(blob)}\0".encode())
        digest.update(blob)
    return "sha256:" + digest.hexdigest()


def _parse_json(blob: bytes, source: str) -> dict[str, Any]:
    try:
        value = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: not valid JSON ({err}); it may be truncated, re-save the checkpoint") from err
    if not isinstance(value, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


def _safetensors_metadata(blob: bytes, source: str) -> dict[str, str]:
    """The __metadata__ of a safetensors file: 8-byte little-endian header size, JSON header."""
    if len(blob) < 8:
        raise ValueError(f"{source}: {len(blob)} bytes, too short for a safetensors header; the file "
                         f"is truncated, re-save the checkpoint")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"{source}: header claims {header_len} bytes but the file has {len(blob) - 8}; "
                         f"the file is truncated, re-save the checkpoint")
    header = _parse_json(blob[8:8 + header_len], f"{source} header")
    text = (header.get("__metadata__") or {}).get(_METADATA_KEY, "")
    metadata = _parse_json(text.encode(), f"{source} metadata {_METADATA_KEY!r}") if text else {}
    if metadata.get("format") != CHECKPOINT_FORMAT or not isinstance(metadata.get("config"), dict):
        raise ValueError(f"{source}: metadata {_METADATA_KEY!r} has format={metadata.get('format')!r}; "
                         f"expected {CHECKPOINT_FORMAT!r} with the config (not written by "
                         f"RFSQTokenizer.save_pretrained?)")
    return metadata


@torch.no_grad()
def reconstruction_metrics(tok: RFSQTokenizer, chunks: Tensor | np.ndarray,
                           batch_size: int = 4096) -> list[dict[str, float]]:
    """chunks: [N, T, A] raw -> one row per l in 1..L: MSE and max abs error of decode(encode(x),
    num_layers=l), in normalised units (against the clipped normalised input) and in raw units
    (against x itself, so clipping to q01/q99 counts as error)."""
    chunks = tok._check_chunks(chunks, "reconstruction_metrics")
    num_rfsq_layers = tok.config.num_layers
    sq_norm = torch.zeros(num_rfsq_layers, dtype=torch.float64)
    sq_raw = torch.zeros(num_rfsq_layers, dtype=torch.float64)
    max_norm = torch.zeros(num_rfsq_layers, dtype=torch.float64)
    max_raw = torch.zeros(num_rfsq_layers, dtype=torch.float64)
    for start in range(0, chunks.shape[0], batch_size):
        raw = chunks[start:start + batch_size]
        norm = tok.normalizer.normalize(raw)
        tokens = tok.encode(raw)
        for index in range(num_rfsq_layers):
            out_norm = tok.decode_normalized(tokens, num_layers=index + 1)
            out_raw = tok.normalizer.unnormalize(out_norm)
            err_norm = (out_norm - norm).double()
            err_raw = (out_raw - raw).double()
            sq_norm[index] += err_norm.pow(2).sum().cpu()
            sq_raw[index] += err_raw.pow(2).sum().cpu()
            max_norm[index] = max(max_norm[index], err_norm.abs().max().cpu())
            max_raw[index] = max(max_raw[index], err_raw.abs().max().cpu())
    count = chunks.numel()
    return [{"num_layers": index + 1,
             "mse_norm": float(sq_norm[index] / count), "max_abs_norm": float(max_norm[index]),
             "mse_raw": float(sq_raw[index] / count), "max_abs_raw": float(max_raw[index])}
            for index in range(num_rfsq_layers)]


__all__ = ["RFSQConfig", "RFSQTokenizer", "ActionNormalizer", "checkpoint_fingerprint",
           "reconstruction_metrics", "CHECKPOINT_FILES"]
