"""What an RSD policy is made of: sizes of the vision front end, backbone, blocks and draft.

One dataclass builds a toy model for tests (`RSDConfig.tiny()`: 2 decoder blocks, hidden 64)
or the Llama-2-7B shape used by the GPU benchmarks (`RSDConfig.llama2_7b_shape()`). The
checkpoint stores it as JSON (`rsd_config.json`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from rsd_ray.protocol import (ACTION_DIM, CHUNK_STEPS, LATENT_DIM, NUM_LEVELS, NUM_RFSQ_LAYERS,
                              POLICY_IMAGE_SIZE, PROPRIO_DIM)

from rsd_ray.policy.motion_feedback import MOTION_FEEDBACK_DIM

DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class RSDConfig:
    # vision front end: a patchify conv per camera (shared weights) + an MLP projector
    image_size: int = POLICY_IMAGE_SIZE
    patch_size: int = 32
    vision_dim: int = 64
    # > 0: a residual CNN of this width (3x3 convs, stride 2 down to the patch grid) added to the
    # patch embedding. A linear patchify sees each patch alone; the stem sees edges across patch
    # borders, which is what localising a bowl to a centimetre needs. Its last conv starts at zero,
    # so a checkpoint without it fine-tunes (`train_policy --init_from`) from identical outputs.
    conv_stem_channels: int = 0
    # > 0: this many spatial-softmax keypoints per camera (SpatialKeypoints): a small full-resolution
    # CNN whose K feature maps are each turned into their expected (x, y) image coordinate, fed to the
    # proprio token by an MLP whose last layer starts at zero (a checkpoint without it fine-tunes from
    # identical outputs). A patch token says "something is in this 8x8 patch"; an expected
    # coordinate moves continuously with the object, to a fraction of a pixel, which is the scale on
    # which LIBERO's init states move a bowl at 64x64 (robomimic's visuomotor policies use the same).
    keypoints: int = 0
    num_cameras: int = 2                  # third-person + wrist
    # (top, left, bottom, right) fractions of the agentview frame kept before the resize; None: the
    # whole frame. At 64x64 one pixel of the whole agentview is ~1.5 cm of table, while the expert
    # places the gripper to ~1 cm: the robot base and the empty table near the camera take rows that
    # a crop gives to the workspace instead. A processor setting: it changes no weight's shape, so a
    # checkpoint without it fine-tunes with it (`train_policy --init_from`).
    agentview_crop: tuple[float, float, float, float] | None = None
    # instruction: UTF-8 bytes, padded (and masked) to a fixed length
    max_instruction_tokens: int = 32
    # 0: every byte is a prefix position (max_instruction_tokens of them). k > 0: the bytes are
    # pooled into k positions by learned queries (InstructionPooler). A LIBERO instruction names
    # its task in a few words, and on a CPU each of the 64 byte positions costs as much backbone
    # time as an image patch: pooling to 2 takes a quarter off a training step (bench/train_step.py).
    instruction_pool_tokens: int = 0
    proprio_dim: int = PROPRIO_DIM
    # 0 or MOTION_FEEDBACK_DIM (6): the previous chunk's commanded translation and the displacement
    # it achieved (rsd_ray/policy/motion_feedback.py), added to the proprio token by a small MLP
    # whose last layer starts at zero (so a checkpoint without it fine-tunes from identical outputs).
    # The policy keeps one chunk of memory per episode to compute it.
    motion_feedback_dim: int = 0
    # Llama-family backbone
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    initializer_range: float = 0.2        # large enough that a random model has peaked outputs
    attn_implementation: str = "sdpa"
    # action blocks: RFSQ layer l of a chunk is T positions; logits [T, D, V]
    chunk_steps: int = CHUNK_STEPS        # T
    action_dim: int = ACTION_DIM          # A
    latent_dim: int = LATENT_DIM          # D
    num_rfsq_layers: int = NUM_RFSQ_LAYERS  # L
    num_levels: int = NUM_LEVELS          # V
    # draft: block-0 hidden states projected hidden -> draft_hidden
    draft_hidden: int = 32
    draft_max_layers: int = NUM_RFSQ_LAYERS - 1   # largest K the draft can propose
    dtype: str = "float32"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.agentview_crop is not None:
            box = tuple(float(v) for v in self.agentview_crop)
            object.__setattr__(self, "agentview_crop", box)   # JSON and the CLI give a list
            if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
                raise ValueError(f"agentview_crop={list(box)}; expected [top, left, bottom, right] fractions of "
                                 f"the frame with 0 <= top < bottom <= 1 and 0 <= left < right <= 1")
        if self.conv_stem_channels < 0:
            raise ValueError(f"conv_stem_channels={self.conv_stem_channels}; expected 0 (no stem) or a width > 0")
        if self.conv_stem_channels and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"conv_stem_channels={self.conv_stem_channels} needs a power-of-two patch_size "
                             f"(stride-2 stages down to the patch grid); got patch_size={self.patch_size}")
        if self.keypoints < 0:
            raise ValueError(f"keypoints={self.keypoints}; expected 0 (off) or K > 0 keypoints per camera")
        if self.instruction_pool_tokens < 0:
            raise ValueError(f"instruction_pool_tokens={self.instruction_pool_tokens}; expected 0 (one position per "
                             f"byte) or k > 0 pooled positions")
        if self.motion_feedback_dim not in (0, MOTION_FEEDBACK_DIM):
            raise ValueError(f"motion_feedback_dim={self.motion_feedback_dim}; expected 0 (off) or {MOTION_FEEDBACK_DIM}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not 1 <= self.draft_max_layers < self.num_rfsq_layers:
            raise ValueError(f"draft_max_layers={self.draft_max_layers}; expected 1..{self.num_rfsq_layers - 1}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {', '.join(DTYPES)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def instruction_length(self) -> int:
        """Prefix positions of the instruction: its padded bytes, or the pooled tokens."""
        return self.instruction_pool_tokens or self.max_instruction_tokens

    @property
    def prefix_length(self) -> int:
        """P: image patches of every camera, one proprio token, the instruction."""
        return self.num_cameras * self.num_patches + 1 + self.instruction_length

    @property
    def state_dim(self) -> int:
        """Width of the state vector the model reads: normalised proprio, then motion feedback."""
        return self.proprio_dim + self.motion_feedback_dim

    @property
    def chunk_length(self) -> int:
        """Positions after the prefix: L blocks of T."""
        return self.num_rfsq_layers * self.chunk_steps

    @classmethod
    def tiny(cls, **overrides: Any) -> "RSDConfig":
        """2 decoder blocks, hidden 64, 2x49 patches: builds in milliseconds on a CPU."""
        return cls(**overrides)

    @classmethod
    def llama2_7b_shape(cls, **overrides: Any) -> "RSDConfig":
        """The Llama-2-7B backbone shape inside OpenVLA-OFT: 32 blocks, hidden 4096, 256 patches
        per camera, draft projected 4096 -> 512."""
        base = dict(patch_size=14, vision_dim=1024, max_instruction_tokens=64, hidden_size=4096,
                    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, initializer_range=0.02, draft_hidden=512, dtype="bfloat16")
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RSDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown RSDConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)
