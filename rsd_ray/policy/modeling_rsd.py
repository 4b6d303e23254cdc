"""The RSD main model: observation -> prefix embeddings -> Llama-family decoder -> RFSQ-layer logits.

Sequence of one chunk (P prefix positions, then L blocks of T positions):

    [camera-0 patches | camera-1 patches | proprio | instruction bytes (padded, masked) or k pooled tokens]
    [block 0: start embedding] [block 1: embed(layer-0 tokens)] ... [block L-1: embed(layer L-2)]

The output at block l gives logits [T, D, V] for RFSQ layer l, conditioned on the prefix and
layers < l; the tokens of one layer are independent given that context. `parallel_queries`
(L blocks of learned queries after the prefix) is the one-pass OpenVLA-OFT-style baseline.
The decoder is used only through `inputs_embeds`, so any transformers Llama-family model fits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from rsd_ray.policy.configuration_rsd import RSDConfig

PAD_BYTE_ID = 0          # instruction bytes are stored as byte + 1, so 0 is free for padding
NUM_BYTE_IDS = 257


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def tokenize_instructions(instructions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes, +1, truncated / zero-padded to max_tokens.

    Returns ids [B, N] long and mask [B, N] bool (False = padding). Deterministic, no vocabulary
    file: a checkpoint is reproducible without a hub.
    """
    ids = torch.full((len(instructions), max_tokens), PAD_BYTE_ID, dtype=torch.long)
    for b, text in enumerate(instructions):
        raw = text.encode("utf-8")[:max_tokens]
        if raw:
            ids[b, :len(raw)] = torch.tensor(list(raw), dtype=torch.long) + 1
    return ids, ids != PAD_BYTE_ID


def backbone_config(config: RSDConfig) -> LlamaConfig:
    """The LlamaConfig of the decoder a fresh RSD model builds (vocab unused: inputs_embeds only)."""
    max_positions = config.prefix_length + config.chunk_length + config.draft_max_layers * config.chunk_steps
    cfg = LlamaConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                      num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                      num_key_value_heads=config.num_key_value_heads, vocab_size=2,
                      max_position_embeddings=max_positions, rope_theta=config.rope_theta,
                      initializer_range=config.initializer_range, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = config.attn_implementation
    return cfg


def conv_stem(config: RSDConfig) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convs from the image to the patch grid, vision_dim out (RSDModel
    zero-initialises the last one, see RSDConfig.conv_stem_channels)."""
    width, stages = config.conv_stem_channels, config.patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    channels = 3
    for _ in range(stages - 1):
        groups = 8 if width % 8 == 0 else 1
        layers += [nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.GELU()]
        channels = width
    return nn.Sequential(*layers, nn.Conv2d(channels, config.vision_dim, kernel_size=3, stride=2, padding=1))


class SpatialKeypoints(nn.Module):
    """Images [B, C, 3, S, S] -> expected (x, y) in [-1, 1] of K soft-argmax maps per camera,
    [B, C, K, 2] (Levine et al. 2016's spatial softmax, as in robomimic). Weights are shared by the
    cameras; the temperature is learned, starting at 1."""

    def __init__(self, config: RSDConfig, width: int = 16):
        super().__init__()
        k = config.keypoints
        # full resolution, then one stride-2 stage: the maps keep half-pixel precision before the
        # soft-argmax averages below it
        self.features = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1), nn.GroupNorm(1, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, k, kernel_size=3, padding=1))
        self.log_temperature = nn.Parameter(torch.zeros(()))
        g = config.image_size // 2
        coords = torch.linspace(-1.0, 1.0, g)
        self.register_buffer("grid_x", coords[None, :].expand(g, g).reshape(-1), persistent=False)
        self.register_buffer("grid_y", coords[:, None].expand(g, g).reshape(-1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c = images.shape[:2]
        maps = self.features(images.flatten(0, 1)).flatten(2)                   # [B*C, K, g*g]
        weights = (maps / self.log_temperature.exp()).softmax(dim=-1)
        xy = torch.stack([weights @ self.grid_x.to(weights.dtype), weights @ self.grid_y.to(weights.dtype)], dim=-1)
        return xy.unflatten(0, (b, c))                                          # [B, C, K, 2]


class VisionEncoder(nn.Module):
    """Patchify conv shared by the cameras (+ an optional residual CNN stem) + position and camera
    embeddings + MLP projector."""

    def __init__(self, config: RSDConfig):
        super().__init__()
        c = config
        self.patch = nn.Conv2d(3, c.vision_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.stem = conv_stem(c) if c.conv_stem_channels else None
        self.position = nn.Parameter(torch.zeros(c.num_patches, c.vision_dim))
        self.camera = nn.Parameter(torch.zeros(c.num_cameras, c.vision_dim))
        self.norm = nn.LayerNorm(c.vision_dim)
        self.projector = nn.Sequential(nn.Linear(c.vision_dim, c.hidden_size), nn.GELU(),
                                       nn.Linear(c.hidden_size, c.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, C, 3, S, S] float in [-1, 1], C cameras -> [B, C * patches, H]
        b, c = images.shape[:2]
        pixels = images.flatten(0, 1)
        x = self.patch(pixels)                                        # [B*C, vision_dim, g, g]
        if self.stem is not None:
            x = x + self.stem(pixels)
        x = x.flatten(2).transpose(1, 2)                              # [B*C, patches, vision_dim]
        x = x.unflatten(0, (b, c)) + self.position + self.camera[:, None]   # [B, C, patches, vision_dim]
        return self.projector(self.norm(x.flatten(1, 2)))


class InstructionPooler(nn.Module):
    """Instruction bytes [B, N] -> k prefix positions [B, k, H]: byte + position embeddings, a
    residual MLP, then k learned queries, each a masked softmax over the bytes
    (RSDConfig.instruction_pool_tokens). Position embeddings keep word order, which a bag of
    bytes would lose ("bowl next to the plate" against "plate next to the bowl")."""

    def __init__(self, config: RSDConfig):
        super().__init__()
        H, N, k = config.hidden_size, config.max_instruction_tokens, config.instruction_pool_tokens
        std = config.initializer_range
        self.byte = nn.Embedding(NUM_BYTE_IDS, H)
        self.position = nn.Parameter(torch.randn(N, H) * std)
        self.mix = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.queries = nn.Parameter(torch.randn(k, H) * std)
        self.out = nn.LayerNorm(H)
        nn.init.normal_(self.byte.weight, std=std)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.byte(ids) + self.position                                   # [B, N, H]
        x = x + self.mix(x)
        scores = torch.einsum("kh,bnh->bkn", self.queries, x) / x.shape[-1] ** 0.5
        # an empty instruction (all padding) pools to zeros instead of NaN
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)
        return self.out(torch.einsum("bkn,bnh->bkh", weights, x))


class RSDModel(nn.Module):
    """Prefix encoder, backbone and block embeddings/head. See the module docstring for layout."""

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def __init__(self, config: RSDConfig, backbone: nn.Module | None = None):
        super().__init__()
        c = self.config = config
        H, T, D, V, L = c.hidden_size, c.chunk_steps, c.latent_dim, c.num_levels, c.num_rfsq_layers
        self.vision = VisionEncoder(c)
        # one of the two: per-byte prefix positions, or k pooled ones
        self.instruction_embed = nn.Embedding(NUM_BYTE_IDS, H) if not c.instruction_pool_tokens else None
        self.instruction_pool = InstructionPooler(c) if c.instruction_pool_tokens else None
        self.proprio_proj = nn.Sequential(nn.Linear(c.proprio_dim, H), nn.GELU(), nn.Linear(H, H))
        self.feedback_proj = (nn.Sequential(nn.Linear(c.motion_feedback_dim, H), nn.GELU(), nn.Linear(H, H))
                              if c.motion_feedback_dim else None)
        self.keypoints = SpatialKeypoints(c) if c.keypoints else None
        self.keypoint_proj = (nn.Sequential(nn.Linear(c.num_cameras * c.keypoints * 2, H), nn.GELU(), nn.Linear(H, H))
                              if c.keypoints else None)
        self.backbone = backbone if backbone is not None else LlamaModel(backbone_config(c))
        std = c.initializer_range
        self.start_block = nn.Parameter(torch.randn(T, H) * std)         # block 0 input
        self.parallel_queries = nn.Parameter(torch.randn(L, T, H) * std)  # parallel-mode blocks
        self.token_embed = nn.Parameter(torch.randn(D * V, H) * std)     # (latent dim, level) -> H
        self.layer_embed = nn.Parameter(torch.randn(L, H) * std)         # which layer a block predicts
        self.step_embed = nn.Parameter(torch.randn(T, H) * std)          # timestep within the chunk
        self.head = nn.Linear(H, D * V)
        for module in (self.vision, self.proprio_proj, self.head):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=std)
        nn.init.normal_(self.vision.position, std=std)
        if self.vision.stem is not None:
            nn.init.zeros_(self.vision.stem[-1].weight)
            nn.init.zeros_(self.vision.stem[-1].bias)
        if self.feedback_proj is not None:
            nn.init.normal_(self.feedback_proj[0].weight, std=std)
            nn.init.zeros_(self.feedback_proj[-1].weight)
            nn.init.zeros_(self.feedback_proj[-1].bias)
        if self.keypoint_proj is not None:
            nn.init.zeros_(self.keypoint_proj[-1].weight)
            nn.init.zeros_(self.keypoint_proj[-1].bias)
        if self.instruction_embed is not None:
            nn.init.normal_(self.instruction_embed.weight, std=std)
        # `level offsets` turn a [.., D] token into D rows of token_embed
        self.register_buffer("level_offsets", torch.arange(D) * V, persistent=False)

    # ---- prefix -------------------------------------------------------------------------
    def encode_prefix(self, images: torch.Tensor, instruction_ids: torch.Tensor,
                      instruction_mask: torch.Tensor, proprio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, 3, S, S] float in [-1, 1]; instruction_ids/mask [B, N]; proprio [B, state_dim]:
        the normalised proprio [8], then the motion feedback when the config has it. Returns
        prefix_embeds [B, P, H] and prefix_mask [B, P] bool."""
        c = self.config
        B = images.shape[0]
        expected = (c.num_cameras, 3, c.image_size, c.image_size)
        if tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, C, 3, S, S] = [B, {expected}]")
        if instruction_ids.shape != (B, c.max_instruction_tokens):
            raise ValueError(f"instruction_ids have shape {tuple(instruction_ids.shape)}; "
                             f"expected [B, N] = [{B}, {c.max_instruction_tokens}]")
        if proprio.shape != (B, c.state_dim):
            raise ValueError(f"proprio has shape {tuple(proprio.shape)}; expected [B, {c.state_dim}] (proprio "
                             f"{c.proprio_dim} + motion feedback {c.motion_feedback_dim})")
        patches = self.vision(images)                                   # [B, C*patches, H]
        state = self.proprio_proj(proprio[:, :c.proprio_dim].contiguous())
        if self.feedback_proj is not None:
            state = state + self.feedback_proj(proprio[:, c.proprio_dim:])
        if self.keypoints is not None:
            state = state + self.keypoint_proj(self.keypoints(images).flatten(1))
        state = state[:, None]                                          # [B, 1, H]
        instruction_mask = instruction_mask.to(patches.device)
        if self.instruction_pool is not None:
            words = self.instruction_pool(instruction_ids, instruction_mask)   # [B, k, H]
            words_mask = torch.ones(B, words.shape[1], dtype=torch.bool, device=patches.device)
        else:
            words, words_mask = self.instruction_embed(instruction_ids), instruction_mask   # [B, N, H]
        embeds = torch.cat([patches, state, words], dim=1)
        mask = torch.cat([torch.ones(B, patches.shape[1] + 1, dtype=torch.bool, device=embeds.device),
                          words_mask], dim=1)
        return embeds, mask

    # ---- blocks -------------------------------------------------------------------------
    def start_inputs(self, batch: int) -> torch.Tensor:
        """Block 0's inputs: [B, T, H]."""
        x = self.start_block + self.layer_embed[0] + self.step_embed
        return x[None].expand(batch, -1, -1)

    def block_inputs(self, prev_tokens: torch.Tensor, layer_ids: torch.Tensor) -> torch.Tensor:
        """prev_tokens [B, T, D, n] int64 in [0, V): the layer before each block; layer_ids [B, n]
        long in [1, L): the layer each block predicts. Returns inputs [B, n*T, H]."""
        B, T, D, n = prev_tokens.shape
        rows = self.token_embed[prev_tokens.permute(0, 3, 1, 2) + self.level_offsets]   # [B, n, T, D, H]
        x = rows.sum(dim=3) + self.layer_embed[layer_ids][:, :, None] + self.step_embed  # [B, n, T, H]
        return x.flatten(1, 2)

    def parallel_inputs(self, batch: int) -> torch.Tensor:
        """The parallel mode's L query blocks: [B, L*T, H]."""
        x = self.parallel_queries + self.layer_embed[:, None] + self.step_embed
        return x.flatten(0, 1)[None].expand(batch, -1, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, n*T, H] -> logits [B, n*T, D, V]."""
        c = self.config
        return self.head(hidden).unflatten(-1, (c.latent_dim, c.num_levels))

    def run_backbone(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                     cache=None) -> torch.Tensor:
        """embeds [B, q, H]; position_ids [B, q]; mask [B, 1, q, k] additive. Returns hidden [B, q, H]."""
        out = self.backbone(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                            past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state


def preprocess_images(frames: list[torch.Tensor], image_size: int, num_cameras: int = 1,
                      agentview_crop: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """frames: B*C uint8 tensors [h, w, 3], cameras minor (agentview first) -> [B*C, 3, S, S]
    float in [-1, 1]: camera 0 cropped to `agentview_crop` (fractions), every frame resized to S."""
    if agentview_crop is None:
        return _to_policy_pixels(torch.stack(frames), image_size)
    top, left, bottom, right = agentview_crop
    per_camera = []
    for camera in range(num_cameras):
        x = torch.stack(frames[camera::num_cameras])
        if camera == 0:
            h, w = x.shape[1:3]
            x = x[:, round(top * h):round(bottom * h), round(left * w):round(right * w)]
        per_camera.append(_to_policy_pixels(x, image_size))
    return torch.stack(per_camera, dim=1).flatten(0, 1)


def _to_policy_pixels(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """[N, h, w, 3] uint8 -> [N, 3, S, S] float in [-1, 1] (bilinear-antialias resize if needed)."""
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0
