"""Training an RSD policy on recorded samples: dataset, teacher-forced forward, draft targets.

The training sequence is the inference sequence with every RFSQ layer's gold tokens known:

    [prefix (P)] [block 0: start embedding] [block 1: embed(gold layer 0)] ... [block L-1: embed(gold layer L-2)]

at positions 0 .. P + L*T - 1 under the causal mask `prefill_mask` builds for the engine's
prefill, so block l's output is what `autoregressive` decoding computes at block l when the
model's own layers < l equal the gold ones (teacher forcing). One backbone pass gives the
logits of all L layers; the loss is the cross-entropy over every [T, D, L] token.

The draft is trained afterwards, on the frozen main model: its input is the main model's
block-0 hidden states [B, T, H] (what the engine hands it after the prefill), its targets the
first K layers of the main model's own greedy `autoregressive` tokens (distillation: under
`exact` acceptance a proposal is accepted when it equals the main model's argmax, so that is
the target that maximises acceptance) or, with `target="gold"`, the demonstrations' tokens.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rsd_ray.decoding.row_cache import prefill_mask
from rsd_ray.policy.checkpoint import ProprioStats
from rsd_ray.policy.configuration_rsd import RSDConfig
from rsd_ray.policy.draft import DraftModel
from rsd_ray.policy.modeling_rsd import RSDModel, preprocess_images, tokenize_instructions

CAMERA_COLUMNS = ("agentview_png", "wrist_png")    # camera order of RSDPolicy.preprocess


# ---- dataset ----------------------------------------------------------------------------
def decode_png(blob: bytes) -> np.ndarray:
    """PNG bytes -> [H, W, 3] uint8."""
    from PIL import Image
    return np.array(Image.open(io.BytesIO(blob)).convert("RGB"))


def samples_fingerprint(table) -> str:
    """sha256 (16 hex) of what training reads from a samples table, in row order: episode key,
    chunk index, instruction, proprio, action chunk and both PNGs. Equal fingerprints, equal data."""
    digest = hashlib.sha256()
    cols = {name: table.column(name).to_pylist() for name in
            ("episode_key", "chunk_index", "instruction", *CAMERA_COLUMNS)}
    proprio = np.asarray(table.column("proprio").to_pylist(), dtype=np.float32)
    chunks = np.asarray(table.column("action_chunk").to_pylist(), dtype=np.float32)
    for i in range(table.num_rows):
        digest.update(f"{cols['episode_key'][i]}|{cols['chunk_index'][i]}|{cols['instruction'][i]}|".encode())
        digest.update(proprio[i].tobytes())
        digest.update(chunks[i].tobytes())
        for name in CAMERA_COLUMNS:
            digest.update(hashlib.sha256(cols[name][i]).digest())
    return digest.hexdigest()[:16]


def sort_samples(table):
    """Rows in (episode_key, chunk_index) order: the fingerprint and the split do not depend on
    the order in which the actors finished episodes."""
    import pyarrow.compute as pc
    order = pc.sort_indices(table, sort_keys=[("episode_key", "ascending"), ("chunk_index", "ascending")])
    return table.take(order)


def action_chunks(table) -> np.ndarray:
    """The table's action_chunk column -> [N, T, A] float32 raw env actions."""
    return np.asarray(table.column("action_chunk").to_pylist(), dtype=np.float32).reshape(table.num_rows, 8, 7)


def proprio_stats(table) -> ProprioStats:
    """q01/q99 per proprio dim over the table (the bounds RSDPolicy normalises with)."""
    proprio = np.asarray(table.column("proprio").to_pylist(), dtype=np.float64)
    return ProprioStats([float(v) for v in np.quantile(proprio, 0.01, axis=0)],
                        [float(v) for v in np.quantile(proprio, 0.99, axis=0)])


@dataclass
class DemoTensors:
    """A samples table decoded once into the model's input space (N rows)."""

    images: torch.Tensor            # [N, C, 3, S, S] float32 in [-1, 1], already resized to S
    instruction_ids: torch.Tensor   # [N, N_instr] long
    instruction_mask: torch.Tensor  # [N, N_instr] bool
    proprio: torch.Tensor           # [N, state_dim] float32: proprio normalised with the checkpoint's
                                    # ProprioStats, then the motion feedback when the config has it
    tokens: torch.Tensor            # [N, T, D, L] int64 in [0, V): RFSQ tokens of the action chunks
    episode_keys: list[str]
    goal_offsets: torch.Tensor | None = None   # [N, 6] float32 metres, NaN where unlabelled

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, index: torch.Tensor) -> "DemoTensors":
        keys = [self.episode_keys[i] for i in index.tolist()]
        offsets = self.goal_offsets[index] if self.goal_offsets is not None else None
        return DemoTensors(self.images[index], self.instruction_ids[index], self.instruction_mask[index],
                           self.proprio[index], self.tokens[index], keys, offsets)

    def batch(self, index: torch.Tensor, shift_px: int | list[int] = 0, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, ...]:
        """-> images [B, C, 3, S, S], ids [B, N_instr], mask [B, N_instr], proprio [B, state_dim], tokens [B, T, D, L].
        shift_px > 0: each image translated by a random whole number of pixels in [-shift_px, shift_px]
        (edge-replicated), a cheap augmentation against overfitting a few hundred demonstrations;
        a list gives each camera its own range (0: that camera untouched)."""
        images = random_shift(self.images[index], shift_px, generator)
        return images, self.instruction_ids[index], self.instruction_mask[index], self.proprio[index], self.tokens[index]


def _per_camera(shift_px: int | list[int], num_cameras: int) -> list[int]:
    if isinstance(shift_px, int):
        return [shift_px] * num_cameras
    if len(shift_px) != num_cameras:
        raise ValueError(f"shift_px={shift_px}: one range per camera expected ({num_cameras})")
    return list(shift_px)


def random_shift(images: torch.Tensor, shift_px: int | list[int], generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """images [B, C, 3, S, S] -> same shape, each (row, camera) shifted by its own random offset in
    [-r, r] pixels, r = shift_px or shift_px[camera]; all ranges 0: the images themselves, no draw.
    One draw per distinct range, so a single range draws exactly what it did before per-camera
    ranges existed (earlier runs' commands reproduce their batches)."""
    B, C, _, S, _ = images.shape
    ranges = torch.tensor(_per_camera(shift_px, C)).repeat(B)                      # [B*C]
    pad = int(ranges.max())
    if pad == 0:
        return images
    flat = images.flatten(0, 1)                                                    # [B*C, 3, S, S]
    padded = F.pad(flat, (pad,) * 4, mode="replicate")
    corners = torch.full((flat.shape[0], 2), pad, dtype=torch.long)              # range 0: unmoved
    for r in sorted(set(ranges.tolist()) - {0}):
        rows = ranges == r
        corners[rows] = pad - r + torch.randint(0, 2 * r + 1, (int(rows.sum()), 2), generator=generator)
    out = torch.stack([padded[i, :, y:y + S, x:x + S] for i, (y, x) in enumerate(corners.tolist())])
    return out.unflatten(0, (B, C))


def drop_cameras(images: torch.Tensor, probabilities: list[float], generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """images [B, C, 3, S, S] in [-1, 1] -> a copy where each row's camera c is blank (0, mid grey)
    with probability probabilities[c], drawn independently per row and camera."""
    drop = torch.rand(images.shape[:2], generator=generator) < torch.tensor(probabilities)
    return images.masked_fill(drop[:, :, None, None, None].to(images.device), 0.0)


def build_demo_tensors(table, config: RSDConfig, tokenizer, proprio: ProprioStats,
                       batch_size: int = 64) -> DemoTensors:
    """Decode every row of a SAMPLE_SCHEMA table: PNGs -> resized images (the same
    `preprocess_images` RSDPolicy runs at evaluation), instruction -> byte ids, proprio ->
    normalised (+ motion feedback from the episode's previous sample, when the config has it),
    action chunk -> RFSQ tokens."""
    n = table.num_rows
    if n == 0:
        raise ValueError("no training samples: the samples table is empty (were the episodes successful, and "
                         "recorded with --records.record_samples=success?)")
    images = []
    pngs = [table.column(name).to_pylist() for name in CAMERA_COLUMNS]
    for lo in range(0, n, batch_size):
        frames = [torch.from_numpy(decode_png(pngs[c][i])) for i in range(lo, min(n, lo + batch_size))
                  for c in range(len(CAMERA_COLUMNS))]
        images.append(preprocess_images(frames, config.image_size, config.num_cameras,
                                        config.agentview_crop).unflatten(0, (-1, config.num_cameras)))
    instructions = table.column("instruction").to_pylist()
    ids, mask = tokenize_instructions(instructions, config.max_instruction_tokens)
    raw_proprio = np.asarray(table.column("proprio").to_pylist(), dtype=np.float32)
    chunks = action_chunks(table)
    state = proprio.normalize(torch.from_numpy(raw_proprio))
    episode_keys = table.column("episode_key").to_pylist()
    if config.motion_feedback_dim:
        from rsd_ray.policy.motion_feedback import feedback_for_samples
        episode_ids = list(zip(table.column("run_id").to_pylist(), episode_keys))
        feedback = feedback_for_samples(episode_ids, table.column("chunk_index").to_pylist(), raw_proprio, chunks)
        state = torch.cat([state, torch.from_numpy(feedback)], dim=1)
    with torch.no_grad():
        tokens = tokenizer.encode(torch.from_numpy(chunks).to(tokenizer.device)).cpu()
    return DemoTensors(torch.cat(images), ids, mask, state, tokens, episode_keys, goal_offset_labels(table))


def goal_offset_labels(table) -> torch.Tensor:
    """SAMPLE_SCHEMA `goal_offsets` -> [N, 6] float32, NaN rows where a sample has none (samples
    recorded without privileged state, or before the column existed)."""
    n = table.num_rows
    if "goal_offsets" not in table.column_names:
        return torch.full((n, 6), float("nan"))
    values = table.column("goal_offsets").to_pylist()
    wrong = next((v for v in values if v is not None and len(v) != 6), None)
    if wrong is not None:
        raise ValueError(f"a sample's goal_offsets has {len(wrong)} values; expected 6 (object - hand, target - hand)")
    return torch.tensor([v if v is not None else [float("nan")] * 6 for v in values], dtype=torch.float32)


# ---- auxiliary localisation target ------------------------------------------------------
GOAL_OFFSET_SCALE_M = 0.1    # offsets span about +/-0.3 m: regress them in units of 10 cm


class GoalOffsetHead(nn.Module):
    """Training-only probe: block-0 hidden states [B, T, H] -> goal_offsets [B, 6] / 10 cm.

    The action head reads the same block-0 states, so a loss on this linear readout asks them to
    carry where the goal object and its target are relative to the hand, which behaviour cloning
    alone did not teach a model that sees the bowl move by 1-2 px between init states
    (bench/approach_tracking.py). Not part of the shipped checkpoint: inference never runs it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.readout = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 6))

    @staticmethod
    def inputs(model: RSDModel, images: torch.Tensor, instruction_ids: torch.Tensor, proprio: torch.Tensor,
               block0_hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What forward reads, out of one batch's model inputs and block-0 states."""
        return (block0_hidden,)

    def forward(self, block0_hidden: torch.Tensor) -> torch.Tensor:
        return self.readout(block0_hidden.mean(dim=1))


class KeypointOffsetHead(nn.Module):
    """Training-only: the agentview's spatial-softmax keypoints [B, K, 2], the normalised proprio
    [B, 8] and which instruction -> goal_offsets [B, 6] / 10 cm, through a small MLP.

    Read from the agentview keypoints, not the block-0 states: a probe on those (v11) learned the
    offsets while the model kept ignoring the agentview (bench/image_reliance.py), since the wrist
    view and the proprio already give the backbone most of them. Here the gradient reaches only the
    keypoint CNN, which then has to find the objects in the agentview; the hand's position comes
    from the proprio, as a third-person camera does not move with it. The instruction is needed
    because it alone says *which* of a scene's two black bowls is the goal object; an embedding per
    distinct instruction of the training data is enough for a head that never leaves training."""

    def __init__(self, num_keypoints: int, proprio_dim: int, instructions: torch.Tensor, width: int = 128,
                 camera: int = 0):
        super().__init__()
        self.camera = camera
        # the distinct instruction_ids rows of the data (torch.unique: sorted, so a resumed run
        # rebuilds the same order); not saved with the head, the data re-supplies them
        self.register_buffer("instructions", instructions.clone(), persistent=False)
        self.observation = nn.Linear(2 * num_keypoints + proprio_dim, width)
        self.instruction = nn.Embedding(len(instructions), width)
        self.readout = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 6))

    def inputs(self, model: RSDModel, images: torch.Tensor, instruction_ids: torch.Tensor, proprio: torch.Tensor,
               block0_hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keypoints of this head's camera only (computed again: a few ms against the backbone's pass)."""
        one_camera = images[:, self.camera:self.camera + 1]
        return model.keypoints(one_camera)[:, 0], proprio[:, :model.config.proprio_dim], instruction_ids

    def forward(self, keypoints: torch.Tensor, proprio: torch.Tensor, instruction_ids: torch.Tensor) -> torch.Tensor:
        match = (instruction_ids[:, None, :] == self.instructions[None]).all(dim=-1)       # [B, n]
        if not match.any(dim=1).all():
            raise ValueError("KeypointOffsetHead: an instruction that is not among the training data's")
        x = self.observation(torch.cat([keypoints.flatten(1), proprio], dim=1))
        return self.readout(x + self.instruction(match.float().argmax(dim=1)))


class PerCameraOffsetHeads(nn.Module):
    """Training-only: one KeypointOffsetHead per camera, each reading its own camera's keypoints
    alone; predictions side by side, [B, 6 * cameras], every one regressed to the same goal offsets
    (goal_offset_loss tiles the label).

    The wrist head is there for the grasp of tasks 4 and 9 of libero_spatial, where the policy's hand
    ends 2-4 cm off the bowl's centre (bench/results/episode_sheet_v16_libero_spatial_9_30.json):
    the agentview head trains the shared keypoint CNN to find the objects in a fixed frame, and a
    third-person camera 64 px wide resolves a bowl to about a centimetre at best, while the wrist
    camera sees the bowl large and relative to the hand, which is what the last centimetre needs."""

    def __init__(self, heads: list[KeypointOffsetHead]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def inputs(self, model: RSDModel, images: torch.Tensor, instruction_ids: torch.Tensor, proprio: torch.Tensor,
               block0_hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x for head in self.heads for x in head.inputs(model, images, instruction_ids, proprio, block0_hidden))

    def forward(self, *head_inputs: torch.Tensor) -> torch.Tensor:
        per_head = len(head_inputs) // len(self.heads)
        return torch.cat([head(*head_inputs[i * per_head:(i + 1) * per_head]) for i, head in enumerate(self.heads)],
                         dim=1)


def goal_offset_loss(head: nn.Module, head_inputs: tuple[torch.Tensor, ...], offsets: torch.Tensor
                     ) -> tuple[torch.Tensor, int]:
    """Mean squared error in 10 cm units of `head(*head_inputs)` over the labelled rows of the
    batch; (0, 0) if none. A head that predicts the offsets several times side by side
    (PerCameraOffsetHeads) has each prediction regressed to the same label."""
    labelled = labelled_rows(offsets)
    if not labelled.any():
        return sum(p.sum() for p in head.parameters()) * 0.0, 0
    pred = head(*(x[labelled] for x in head_inputs))
    target = offsets[labelled].to(pred.dtype) / GOAL_OFFSET_SCALE_M
    if pred.shape[1] != target.shape[1]:
        target = target.repeat(1, pred.shape[1] // target.shape[1])
    return F.mse_loss(pred, target), int(labelled.sum())


def labelled_rows(offsets: torch.Tensor) -> torch.Tensor:
    """[N, 6] goal offsets -> [N] bool: the rows that have a label (not NaN)."""
    return ~torch.isnan(offsets).any(dim=1)


def check_instructions(instructions: Iterable[str], max_tokens: int) -> None:
    """Truncation to max_instruction_tokens bytes must not merge two different instructions."""
    distinct = sorted(set(instructions))
    cut = {s.encode("utf-8")[:max_tokens] for s in distinct}
    if len(cut) < len(distinct):
        longest = max(len(s.encode("utf-8")) for s in distinct)
        raise ValueError(f"max_instruction_tokens={max_tokens} truncates {len(distinct)} distinct instructions to "
                         f"{len(cut)}; expected >= {longest} (the longest instruction's bytes)")


# ---- teacher-forced forward -------------------------------------------------------------
def teacher_forced_logits(model: RSDModel, images: torch.Tensor, instruction_ids: torch.Tensor,
                          instruction_mask: torch.Tensor, proprio: torch.Tensor, tokens: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone pass over prefix + L blocks, block l fed the gold tokens of layer l-1.

    images [B, C, 3, S, S]; instruction_ids/mask [B, N]; proprio [B, 8] normalised;
    tokens [B, T, D, L] int64 in [0, V) gold. Returns logits [B, T, D, L, V] and the block-0
    hidden states [B, T, H] (the draft's input)."""
    c = model.config
    T, D, L = c.chunk_steps, c.latent_dim, c.num_rfsq_layers
    B = images.shape[0]
    if tokens.shape != (B, T, D, L):
        raise ValueError(f"tokens have shape {tuple(tokens.shape)}; expected [B, T, D, L] = [{B}, {T}, {D}, {L}]")
    prefix, pmask = model.encode_prefix(images, instruction_ids, instruction_mask, proprio)   # [B, P, H], [B, P]
    P = prefix.shape[1]
    layer_ids = torch.arange(1, L, device=prefix.device)[None].expand(B, -1)                  # [B, L-1]
    blocks = model.block_inputs(tokens[..., :L - 1], layer_ids)                                # [B, (L-1)*T, H]
    x = torch.cat([prefix, model.start_inputs(B).to(prefix.dtype), blocks.to(prefix.dtype)], dim=1)
    kmask = torch.cat([pmask, torch.ones(B, L * T, dtype=torch.bool, device=pmask.device)], dim=1)
    pos = torch.arange(P + L * T, device=prefix.device)[None].expand(B, -1)
    hidden = model.run_backbone(x, pos, prefill_mask(kmask, prefix.dtype), None)[:, P:]       # [B, L*T, H]
    logits = model.logits(hidden)                                                              # [B, L*T, D, V]
    return logits.unflatten(1, (L, T)).permute(0, 2, 3, 1, 4), hidden[:, :T]


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, D, n, V]; tokens [B, T, D, n] int64. Returns per-layer cross-entropy [n] and
    per-layer token accuracy [n] (argmax == token)."""
    ce = F.cross_entropy(logits.flatten(0, -2).float(), tokens.flatten(), reduction="none").view(tokens.shape)
    acc = (logits.argmax(-1) == tokens).float()
    return ce.mean(dim=(0, 1, 2)), acc.mean(dim=(0, 1, 2))


def draft_teacher_forced_logits(draft: DraftModel, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The draft's `propose` recurrence with its own choices replaced by the target tokens.

    hidden [B, T, H] block-0 hidden states; tokens [B, T, D, K] int64 target layers 0..K-1.
    Returns logits [B, T, D, K, V]. With tokens = the draft's own greedy proposals the argmax
    of these logits equals `propose` (tests pin it)."""
    c = draft.config
    K = tokens.shape[3]
    if not 1 <= K <= c.draft_max_layers:
        raise ValueError(f"draft targets have {K} layers; this draft proposes 1..{c.draft_max_layers}")
    state = draft.in_proj(hidden)                                                      # [B, T, E]
    out = []
    for k in range(K):
        x = state + draft.layer_embed[k]
        x = x + draft.mlp(draft.norm(x))
        out.append(draft.head(x).unflatten(-1, (c.latent_dim, c.num_levels)))         # [B, T, D, V]
        state = x + draft.token_embed[tokens[..., k] + draft.level_offsets].sum(dim=2)
    return torch.stack(out, dim=3)


@torch.no_grad()
def main_model_targets(model: RSDModel, demos: DemoTensors, num_layers: int, batch_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen main model's block-0 hidden states [N, T, H] and its greedy autoregressive
    tokens of layers 0..num_layers-1 [N, T, D, K] for every row of `demos` (the draft's
    inputs and distillation targets), decoded by the engine itself so the layout is its own."""
    from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings

    model.eval()
    engine = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch_size))
    hiddens, tokens = [], []
    for lo in range(0, len(demos), batch_size):
        index = torch.arange(lo, min(len(demos), lo + batch_size))
        images, ids, mask, proprio, _ = demos.batch(index)
        prefix, pmask = model.encode_prefix(images, ids, mask, proprio)
        result = engine.run(prefix, pmask)
        greedy = result.tokens                                                         # [b, T, D, L]
        _, h0 = teacher_forced_logits(model, images, ids, mask, proprio, greedy)
        hiddens.append(h0)
        tokens.append(greedy[..., :num_layers])
    return torch.cat(hiddens), torch.cat(tokens)
