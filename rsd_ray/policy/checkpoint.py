"""An RSD policy checkpoint: one local directory, no hub.

    rsd_config.json               RSDConfig fields + "format"
    backbone/                     the decoder in transformers format (config.json + model.safetensors);
                                  any Llama-family causal LM directory can stand here
    heads.safetensors             everything of RSDModel outside the backbone (vision, projector,
                                  instruction/proprio embeddings, block embeddings, head)
    draft.safetensors             DraftModel
    rfsq/                         RFSQTokenizer.save_pretrained (incl. action normalisation)
    proprio_normalization.json    q01/q99 of the 8 proprio dims

Every load error names the file and the field or tensor at fault.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsd_ray.decoding.state_check import check_state_dict
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel
from rsd_ray.policy.modeling_rsd import RSDModel, torch_dtype

POLICY_FORMAT = "rsd_ray.policy/1"
CONFIG_FILE = "rsd_config.json"
BACKBONE_DIR = "backbone"
HEADS_FILE = "heads.safetensors"
DRAFT_FILE = "draft.safetensors"
RFSQ_DIR = "rfsq"
PROPRIO_FILE = "proprio_normalization.json"

# backbone config field -> RSDConfig field that must agree
_BACKBONE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size")
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite")


@dataclass
class ProprioStats:
    q01: list[float]
    q99: list[float]

    def normalize(self, proprio: torch.Tensor) -> torch.Tensor:
        """proprio [B, 8] raw -> [B, 8] in [-1, 1] (clipped), the OpenVLA-OFT bounds_q99 rule."""
        low = torch.tensor(self.q01, dtype=proprio.dtype, device=proprio.device)
        span = (torch.tensor(self.q99, dtype=proprio.dtype, device=proprio.device) - low).clamp_min(1e-8)
        return (2.0 * (proprio - low) / span - 1.0).clamp(-1.0, 1.0)

    @classmethod
    def identity(cls, dim: int) -> "ProprioStats":
        return cls([-1.0] * dim, [1.0] * dim)


@dataclass
class LoadedPolicy:
    config: RSDConfig
    model: RSDModel
    draft: DraftModel
    tokenizer: Any               # RFSQTokenizer
    proprio: ProprioStats
    random_weights: bool = False


def _state_without_backbone(model: RSDModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def save_policy(path: str | Path, model: RSDModel, draft: DraftModel, tokenizer, proprio: ProprioStats) -> Path:
    """Write the whole policy directory (see module docstring)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_json = {"format": POLICY_FORMAT, **model.config.to_dict()}
    (path / CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    model.backbone.save_pretrained(path / BACKBONE_DIR)
    save_file({k: v.detach().cpu().contiguous() for k, v in _state_without_backbone(model).items()},
              str(path / HEADS_FILE), metadata={"format": POLICY_FORMAT})
    save_file({k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()},
              str(path / DRAFT_FILE), metadata={"format": POLICY_FORMAT})
    tokenizer.save_pretrained(path / RFSQ_DIR)
    (path / PROPRIO_FILE).write_text(json.dumps({"q01": proprio.q01, "q99": proprio.q99}, indent=2) + "\n")
    return path


def save_config_only(path: str | Path, config: RSDConfig) -> Path:
    """A weightless checkpoint (e.g. the 7B shape for benchmarks): load it with
    allow_random_weights=True to get a randomly initialised policy of that shape."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"format": POLICY_FORMAT, **config.to_dict()}, indent=2,
                                               sort_keys=True) + "\n")
    return path


def read_config(path: str | Path) -> RSDConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"RSD checkpoint directory {str(path)!r} does not exist; expected a directory "
                                f"with {CONFIG_FILE} (make one with scripts/make_random_checkpoint.py)")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"RSD checkpoint {str(path)!r} has no {CONFIG_FILE}; expected the files "
                                f"{CONFIG_FILE}, {BACKBONE_DIR}/, {HEADS_FILE}, {DRAFT_FILE}, {RFSQ_DIR}/, {PROPRIO_FILE}")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    fmt = values.pop("format", None)
    if fmt != POLICY_FORMAT:
        raise ValueError(f"{file}: field format={fmt!r}; expected {POLICY_FORMAT!r}")
    return RSDConfig.from_dict(values, source=str(file))


def load_backbone(path: str | Path, config: RSDConfig | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Any transformers Llama-family decoder (or causal LM: its base model is taken) from a local
    directory. With `config`, the backbone's sizes must match the RSD config's."""
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"backbone directory {str(path)!r} has no config.json; expected a transformers "
                                f"model directory (save_pretrained) of a Llama-family model")
    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hf_config.model_type not in LLAMA_FAMILY:
        raise ValueError(f"{cfg_file}: field model_type={hf_config.model_type!r}; expected a Llama-family "
                         f"decoder ({', '.join(LLAMA_FAMILY)})")
    if config is not None:
        for name in _BACKBONE_FIELDS:
            got = getattr(hf_config, name, None)
            if name == "num_key_value_heads" and got is None:
                got = hf_config.num_attention_heads
            want = getattr(config, name)
            if got != want:
                raise ValueError(f"{cfg_file}: field {name}={got}; {CONFIG_FILE} says {name}={want}")
        hf_config._attn_implementation = config.attn_implementation
    kwargs: dict[str, Any] = {"local_files_only": True, "config": hf_config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    backbone = AutoModel.from_pretrained(str(path), **kwargs)
    return getattr(backbone, "model", backbone) if not hasattr(backbone, "layers") else backbone


def _load_tensors(file: Path, module: nn.Module, skip_prefix: str | None = None) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"RSD checkpoint {str(file.parent)!r} has no {file.name}")
    try:
        tensors = load_file(str(file))
    except Exception as err:  # safetensors has its own error type for corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    expected = {k: v for k, v in module.state_dict().items()
                if skip_prefix is None or not k.startswith(skip_prefix)}
    check_state_dict(str(file), tensors, expected, CONFIG_FILE)
    module.load_state_dict(tensors, strict=False)


def load_policy(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                allow_random_weights: bool = False) -> LoadedPolicy:
    """Read a policy directory. dtype overrides rsd_config.json's. allow_random_weights: a
    directory with only rsd_config.json gives a random policy of that shape (benchmarks)."""
    from rsd_ray.decoding.rfsq import RFSQTokenizer

    path = Path(path)
    config = read_config(path)
    torch_type = torch_dtype(dtype or config.dtype)
    weights = [path / BACKBONE_DIR, path / HEADS_FILE, path / DRAFT_FILE, path / RFSQ_DIR]
    if allow_random_weights and not any(p.exists() for p in weights):
        warnings.warn(f"{path}: no weights, building a randomly initialised policy of this shape", stacklevel=2)
        from rsd_ray.decoding.rfsq import RFSQConfig
        from rsd_ray.decoding.synthetic_actions import synthetic_chunks
        with torch.device(device):
            model, draft = RSDModel(config), DraftModel(config)
        tokenizer = RFSQTokenizer(RFSQConfig())
        tokenizer.normalizer.fit(synthetic_chunks(256, seed=0))
        return LoadedPolicy(config, model.to(torch_type).eval(), draft.to(torch_type).eval(),
                            tokenizer.to(device).eval(), ProprioStats.identity(config.proprio_dim), True)
    backbone_dir = path / BACKBONE_DIR
    if not backbone_dir.is_dir():
        raise FileNotFoundError(f"RSD checkpoint {str(path)!r} has no {BACKBONE_DIR}/ directory "
                                f"(a transformers Llama-family model saved with save_pretrained)")
    backbone = load_backbone(backbone_dir, config, dtype=torch.float32)
    model = RSDModel(config, backbone=backbone)
    _load_tensors(path / HEADS_FILE, model, skip_prefix="backbone.")
    draft = DraftModel(config)
    _load_tensors(path / DRAFT_FILE, draft)
    tokenizer = RFSQTokenizer.from_pretrained(path / RFSQ_DIR, expect={
        "chunk_steps": config.chunk_steps, "action_dim": config.action_dim, "latent_dim": config.latent_dim,
        "num_layers": config.num_rfsq_layers, "num_levels": config.num_levels}, map_location=device)
    proprio_file = path / PROPRIO_FILE
    if not proprio_file.is_file():
        raise FileNotFoundError(f"RSD checkpoint {str(path)!r} has no {PROPRIO_FILE}")
    values = json.loads(proprio_file.read_text())
    for key in ("q01", "q99"):
        seq = values.get(key)
        if not isinstance(seq, list) or len(seq) != config.proprio_dim:
            raise ValueError(f"{proprio_file}: field {key}={seq!r}; expected a list of "
                             f"proprio_dim={config.proprio_dim} numbers")
    proprio = ProprioStats([float(v) for v in values["q01"]], [float(v) for v in values["q99"]])
    return LoadedPolicy(config, model.to(device=device, dtype=torch_type).eval(),
                        draft.to(device=device, dtype=torch_type).eval(), tokenizer, proprio)


def average_policies(sources: list[str | Path], out: str | Path) -> Path:
    """A uniform average of the weights of several policies (a "model soup", Wortsman et al.
    2022), written to `out` as a policy directory. Averaging is only meaningful between
    fine-tunes of one checkpoint, so the sources must share their rsd_config.json, RFSQ
    tokenizer and proprio normalisation; anything else is refused, naming what differs."""
    from rsd_ray.decoding.rfsq import checkpoint_fingerprint

    sources, out = [Path(s) for s in sources], Path(out)
    if len(sources) < 2:
        raise ValueError(f"average_policies: got {len(sources)} source(s); averaging needs at least two")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"average_policies: {str(out)!r} exists and is not empty; a stale file "
                              f"there would end up in the averaged checkpoint")
    first = sources[0]
    loaded = [load_policy(first)]
    for other in sources[1:]:
        if read_config(other).to_dict() != loaded[0].config.to_dict():
            raise ValueError(f"average_policies: {other / CONFIG_FILE} differs from {first / CONFIG_FILE}; "
                             f"only fine-tunes of one checkpoint can be averaged")
        if checkpoint_fingerprint(other / RFSQ_DIR) != checkpoint_fingerprint(first / RFSQ_DIR):
            raise ValueError(f"average_policies: {other / RFSQ_DIR} is another RFSQ tokenizer than "
                             f"{first / RFSQ_DIR}; the averaged policy's tokens would mean nothing")
        policy = load_policy(other)
        if policy.proprio != loaded[0].proprio:
            raise ValueError(f"average_policies: {other / PROPRIO_FILE} differs from {first / PROPRIO_FILE}")
        loaded.append(policy)
    for module in ("model", "draft"):
        states = [getattr(policy, module).state_dict() for policy in loaded]
        # accumulated in float64: for two float32 sources this is (a + b) / 2 rounded once, exactly
        mean = {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
                    if v.is_floating_point() else v) for k, v in states[0].items()}
        getattr(loaded[0], module).load_state_dict(mean)
    return save_policy(out, loaded[0].model, loaded[0].draft, loaded[0].tokenizer, loaded[0].proprio)


# LIBERO proprio (eef pos, eef axis-angle, gripper qpos): rough bounds for random checkpoints
RANDOM_PROPRIO_Q01 = [-0.4, -0.4, 0.0, -3.2, -3.2, -3.2, 0.0, -0.05]
RANDOM_PROPRIO_Q99 = [0.4, 0.4, 1.4, 3.2, 3.2, 3.2, 0.05, 0.0]


def build_random_checkpoint(path: str | Path, config: RSDConfig, seed: int = 0) -> Path:
    """A randomly initialised policy (model, draft, RFSQ tokenizer fitted on synthetic actions)
    saved to `path`; for tests, smoke runs and benchmarks."""
    from rsd_ray.decoding.rfsq import RFSQConfig, RFSQTokenizer
    from rsd_ray.decoding.synthetic_actions import synthetic_chunks

    torch.manual_seed(seed)
    model, draft = RSDModel(config).eval(), DraftModel(config).eval()
    tokenizer = RFSQTokenizer(RFSQConfig(chunk_steps=config.chunk_steps, action_dim=config.action_dim,
                                         latent_dim=config.latent_dim, num_layers=config.num_rfsq_layers,
                                         num_levels=config.num_levels))
    tokenizer.normalizer.fit(synthetic_chunks(512, seed=seed))
    return save_policy(path, model, draft, tokenizer, ProprioStats(RANDOM_PROPRIO_Q01, RANDOM_PROPRIO_Q99))
