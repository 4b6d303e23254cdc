"""Train a small RSD policy on recorded demonstrations and write a loadable checkpoint.

    python jobs/train_policy.py --data='[runs/demos/demos-libero_spatial]' --out_dir=checkpoints/default_policy
    python jobs/train_policy.py ... --resume=true          # continue from the last saved step
    python jobs/eval_libero.py --policy.kind=rsd --policy.checkpoint=checkpoints/default_policy

Phases (each resumable; `--resume` picks up where the state file in work_dir left off):
1. rfsq:  fit the RFSQ tokenizer on the demonstrations' action chunks (jobs/train_rfsq.py's
          `train_rfsq`), saved to work_dir/rfsq and reused on resume so the tokens never change.
2. main:  the RSD model, teacher-forced, cross-entropy on all L RFSQ layers weighted toward the
          coarse ones (`layer_weights`); ends with the weights of the best weighted val CE.
3. draft: the draft on the coarse layers, from the frozen main model's block-0 hidden states,
          distilled from the main model's greedy tokens (or the gold ones: --draft_target=gold).
Then `save_policy(out_dir)` (RSDPolicy.from_pretrained loads it), plus out_dir/README.md and
out_dir/training.json with the command, the data fingerprint and the final figures, and a
learning curve (PNG + JSON) at results_prefix.

Data: one or more run directories whose samples/ were written by jobs/collect_demos.py (or any
run with --records.record_samples); rows are sorted by (episode key, chunk) and split into
train / validation by episode, seeded.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np
import torch

from rsd_ray.decoding.rfsq import RFSQConfig, RFSQTokenizer
from rsd_ray.policy.configuration_rsd import RSDConfig

STATE_FILE = "train_state.pt"
# Model fields an --init_from checkpoint may lack (value 0): they add modules whose output starts
# at zero, so the grown model computes exactly what the checkpoint did; see GROWN_PREFIXES.
GROWABLE_FIELDS = ("conv_stem_channels", "motion_feedback_dim", "keypoints")
GROWN_PREFIXES = ("vision.stem.", "feedback_proj.", "keypoints.", "keypoint_proj.")
# Pooling the instruction (instruction_pool_tokens > 0) onto a checkpoint that read it byte by
# byte *replaces* its byte embedding by a fresh InstructionPooler: everything else (vision,
# proprio, blocks, backbone, head, draft) carries over, but the start is not the checkpoint's
# outputs, since the backbone's instruction positions now hold other vectors.
REPLACED_FIELD, REPLACED_PREFIX, DROPPED_KEYS = "instruction_pool_tokens", "instruction_pool.", ("instruction_embed.weight",)
# Processor settings: they change what the images show, not the shape of any weight, so a fine-tune
# may set them to anything (the model then starts from the checkpoint's weights, not its outputs).
PROCESSOR_FIELDS = ("agentview_crop",)
PHASES = ("main", "draft", "done")


# where the auxiliary goal-offset regression reads from (TrainPolicyConfig.goal_offset_source)
GOAL_OFFSET_SOURCES = ("block0", "keypoints", "keypoints+wrist")


def default_model() -> RSDConfig:
    """Sized for minutes on a CPU core (~1.2 s per batch of 32 on one shared core): 64x64 images in
    8x8 patches (2 x 64 patches), 64 instruction bytes (check_instructions refuses a length that
    merges two instructions), 4 Llama blocks of hidden 128 (~0.7 M parameters)."""
    return RSDConfig.tiny(image_size=64, patch_size=8, vision_dim=64, max_instruction_tokens=64,
                          hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, initializer_range=0.02, draft_hidden=64)


@dataclass
class TrainPolicyConfig:
    data: list[str] = field(default_factory=list)    # run directories with samples/
    # Run directories that supersede some tasks: every (suite, task) they hold is taken from them
    # only, and that task's samples in `data` are dropped (tasks re-collected with a changed expert).
    replace_tasks_from: list[str] = field(default_factory=list)
    out_dir: str = "checkpoints/default_policy"      # the policy checkpoint (save_policy)
    work_dir: str | None = None      # resumable state + tokenizer; None: runs/train_policy/<out_dir name>
    results_prefix: str | None = None   # learning curve .json/.png; None: bench/results/train_policy_<name>
    resume: bool = False
    # A policy checkpoint to start from (fine-tuning on more data): its RFSQ tokenizer and proprio
    # normalisation are kept, so its tokens and inputs mean what its weights learned; the model
    # config must equal it. None: train the tokenizer and the policy from scratch.
    init_from: str | None = None
    seed: int = 0
    val_fraction: float = 0.1        # of the episodes, held out (0: none)
    model: RSDConfig = field(default_factory=default_model)
    # RFSQ tokenizer
    rfsq: RFSQConfig = field(default_factory=RFSQConfig)
    rfsq_steps: int = 1500
    rfsq_batch_size: int = 256
    rfsq_lr: float = 2e-3
    # main model
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    shift_px: int = 3                # random image translation (augmentation); 0 = off
    # One translation range per camera (agentview, wrist) in place of shift_px, or [] (shift_px for
    # both). [0, 3] keeps the agentview's geometry, which the keypoints' goal-offset regression
    # reads (3 px moves a bowl by ~5 cm there), while the wrist view is still augmented.
    shift_px_per_camera: list[int] = field(default_factory=list)
    # One probability per camera (agentview, wrist), or [] (off): each training sample's image of
    # that camera is blanked with that probability. A policy fitted on both views can lean on the
    # wrist view alone (bench/image_reliance.py: swapping v5's agentview between episodes moves none
    # of its predictions); blanking the wrist view now and then makes the agentview carry the loss.
    camera_dropout: list[float] = field(default_factory=list)
    # > 0: add this weight times an auxiliary regression of the samples' goal_offsets (goal object
    # and target relative to the hand, recorded from privileged state by collect_demos) from the
    # block-0 hidden states (rsd_ray.policy.training.GoalOffsetHead); unlabelled rows are skipped.
    goal_offset_weight: float = 0.0
    # Where that regression reads from: block0 (GoalOffsetHead, the block-0 hidden states) or
    # keypoints (KeypointOffsetHead: the agentview's spatial-softmax keypoints, the proprio and which
    # instruction, so the loss trains the keypoint CNN to find the objects in the agentview; needs
    # model.keypoints > 0), or keypoints+wrist (PerCameraOffsetHeads: that head and a second one
    # reading the wrist camera's keypoints alone, so the same CNN also learns where the object is
    # relative to the hand, to the centimetre a grasp inside a bowl needs).
    goal_offset_source: str = "block0"
    # > 0: validate, select and ship an exponential moving average of the weights (this decay per
    # step) instead of the raw ones. Closed-loop success of raw weights swung 41-56 / 100 between
    # checkpoints of equal val CE; an average over the last ~1/(1-decay) steps is the usual cure.
    ema_decay: float = 0.0
    # Cross-entropy weight per RFSQ layer. The coarse layers carry the motion; the fine ones
    # refine it by < 1e-3 of the action range, are close to noise on a few hundred demos, and
    # with equal weights the model spends its capacity memorising them (val CE rising while
    # train CE falls). None: equal weights.
    layer_weights: list[float] | None = field(default_factory=lambda: [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0625])
    keep_best: bool = True           # end the main phase with the weights of the best weighted val CE
    max_minutes: float | None = None   # cap on the main phase's wall time (state is saved)
    on_max_minutes: str = "finish"   # finish: go on to the draft and write the checkpoint; stop: exit (resumable)
    eval_every: int = 100            # validation cross-entropy every N steps
    save_every: int = 100            # train state every N steps
    # draft
    draft_steps: int = 600
    draft_lr: float = 3e-3
    draft_batch_size: int = 128
    draft_target: str = "main"       # main: the main model's greedy tokens (max acceptance); gold
    draft_train_layers: int | None = None   # K the draft is trained on (None: model.draft_max_layers)
    num_threads: int = 1             # torch CPU threads (the dev box is shared)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("train_policy: data=[]; expected --data='[RUN_DIR, ...]' (run directories with samples/, "
                             "e.g. from jobs/collect_demos.py)")
        if self.on_max_minutes not in ("finish", "stop"):
            raise ValueError(f"train_policy: on_max_minutes={self.on_max_minutes!r}; expected finish or stop")
        if self.draft_target not in ("main", "gold"):
            raise ValueError(f"train_policy: draft_target={self.draft_target!r}; expected main or gold")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train_policy: val_fraction={self.val_fraction}; expected a value in [0, 1)")
        for name in ("steps", "batch_size", "rfsq_steps", "draft_batch_size", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train_policy: {name}={getattr(self, name)}; expected >= 1")
        if self.draft_train_layers is not None and not 1 <= self.draft_train_layers <= self.model.draft_max_layers:
            raise ValueError(f"train_policy: draft_train_layers={self.draft_train_layers}; expected "
                             f"1..model.draft_max_layers={self.model.draft_max_layers}")
        if self.layer_weights is not None and (len(self.layer_weights) != self.model.num_rfsq_layers
                                               or min(self.layer_weights) < 0 or sum(self.layer_weights) <= 0):
            raise ValueError(f"train_policy: layer_weights={self.layer_weights}; expected "
                             f"{self.model.num_rfsq_layers} non-negative weights, not all zero")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train_policy: ema_decay={self.ema_decay}; expected 0 (off) or a decay in (0, 1)")
        if self.camera_dropout and (len(self.camera_dropout) != self.model.num_cameras
                                    or not all(0.0 <= p < 1.0 for p in self.camera_dropout)):
            raise ValueError(f"train_policy: camera_dropout={self.camera_dropout}; expected [] (off) or one "
                             f"probability in [0, 1) per camera ({self.model.num_cameras}: agentview, wrist)")
        if self.shift_px < 0 or self.shift_px_per_camera and (len(self.shift_px_per_camera) != self.model.num_cameras
                                                              or min(self.shift_px_per_camera) < 0):
            raise ValueError(f"train_policy: shift_px={self.shift_px}, shift_px_per_camera={self.shift_px_per_camera}; "
                             f"expected shift_px >= 0 and [] or one range >= 0 per camera "
                             f"({self.model.num_cameras}: agentview, wrist)")
        if self.goal_offset_source not in GOAL_OFFSET_SOURCES:
            raise ValueError(f"train_policy: goal_offset_source={self.goal_offset_source!r}; expected one of "
                             f"{', '.join(GOAL_OFFSET_SOURCES)}")
        if self.goal_offset_source != "block0" and not self.model.keypoints:
            raise ValueError(f"train_policy: goal_offset_source={self.goal_offset_source} needs a model with keypoints; "
                             f"set --model.keypoints=K (e.g. 16)")
        if self.goal_offset_source == "keypoints+wrist" and self.model.num_cameras < 2:
            raise ValueError(f"train_policy: goal_offset_source=keypoints+wrist needs the wrist camera; the model has "
                             f"num_cameras={self.model.num_cameras}")
        if self.goal_offset_weight < 0:
            raise ValueError(f"train_policy: goal_offset_weight={self.goal_offset_weight}; expected >= 0 (0: off)")
        if self.draft_steps < 0:
            raise ValueError(f"train_policy: draft_steps={self.draft_steps}; expected >= 0")
        rf, m = self.rfsq, self.model
        for a, b in (("chunk_steps", "chunk_steps"), ("action_dim", "action_dim"), ("latent_dim", "latent_dim"),
                     ("num_layers", "num_rfsq_layers"), ("num_levels", "num_levels")):
            if getattr(rf, a) != getattr(m, b):
                raise ValueError(f"train_policy: rfsq.{a}={getattr(rf, a)} but model.{b}={getattr(m, b)}; expected equal")

    def layer_weight_tensor(self) -> torch.Tensor:
        """[L] weights summing to 1."""
        w = torch.tensor(self.layer_weights or [1.0] * self.model.num_rfsq_layers, dtype=torch.float32)
        return w / w.sum()

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir or Path("runs/train_policy") / Path(self.out_dir).name)

    @property
    def resolved_results_prefix(self) -> str:
        return self.results_prefix or f"bench/results/train_policy_{Path(self.out_dir).name}"


def ema_model(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel as an exponential moving average whose decay ramps up as
    min(decay, (1 + n) / (10 + n)) over the first updates n, so a run from scratch does not
    carry its random initial weights for ~1/(1 - decay) steps."""
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update)


def load_samples(data: list[str], replace_tasks_from: list[str]):
    """The samples of `data`, with every (suite, task) present in `replace_tasks_from` taken from
    those runs instead (see TrainPolicyConfig.replace_tasks_from)."""
    import pyarrow as pa

    from rsd_ray.records.writer import read_samples

    table = read_samples(data)
    if not replace_tasks_from:
        return table
    newer = read_samples(replace_tasks_from)
    if newer.num_rows == 0:
        raise ValueError(f"train_policy: replace_tasks_from={replace_tasks_from} holds no samples")
    def tasks(t):
        return list(zip(t.column("suite").to_pylist(), t.column("task_id").to_pylist()))

    replaced = set(tasks(newer))
    keep = [task not in replaced for task in tasks(table)]
    print(f"[train_policy] tasks {sorted(replaced)} from {replace_tasks_from} only: "
          f"{keep.count(False)} of their samples in --data dropped")
    return pa.concat_tables([table.filter(pa.array(keep)), newer])


def make_offset_head(config: TrainPolicyConfig, instructions: torch.Tensor) -> torch.nn.Module:
    """The training-only readout of goal_offsets that config.goal_offset_source names;
    `instructions` are the data's distinct instruction_ids rows."""
    from rsd_ray.policy.training import GoalOffsetHead, KeypointOffsetHead, PerCameraOffsetHeads

    if config.goal_offset_source == "block0":
        return GoalOffsetHead(config.model.hidden_size)
    m = config.model
    agentview = KeypointOffsetHead(m.keypoints, m.proprio_dim, instructions, camera=0)
    if config.goal_offset_source == "keypoints":
        return agentview
    return PerCameraOffsetHeads([agentview, KeypointOffsetHead(m.keypoints, m.proprio_dim, instructions, camera=1)])


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _split(keys: list[str], val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, val), split by episode so no episode is on both sides."""
    episodes = sorted(set(keys))
    rng = np.random.default_rng(seed)
    num_val = int(round(val_fraction * len(episodes))) if len(episodes) > 1 else 0
    val_eps = set(rng.permutation(episodes)[:num_val].tolist())
    is_val = np.array([k in val_eps for k in keys])
    return torch.from_numpy(np.nonzero(~is_val)[0]), torch.from_numpy(np.nonzero(is_val)[0])


def _start_from_checkpoint(config: TrainPolicyConfig, rfsq_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load config.init_from (a policy checkpoint) and put its tokenizer in work_dir/rfsq, where a
    resumed run finds it like a trained one. Returns (LoadedPolicy, the tokenizer's metrics)."""
    from rsd_ray.policy.checkpoint import RFSQ_DIR, load_policy, read_config

    source = Path(config.init_from)
    if not source.is_dir():
        raise FileNotFoundError(f"train_policy: init_from={str(source)!r} is not a policy checkpoint directory")
    theirs, ours = asdict(read_config(source)), asdict(config.model)
    differ = {k: (ours[k], v) for k, v in theirs.items() if ours[k] != v and k not in PROCESSOR_FIELDS
              and not (k in GROWABLE_FIELDS + (REPLACED_FIELD,) and v == 0)}
    if differ:
        raise ValueError(f"train_policy: model config differs from init_from={str(source)!r}: "
                         + ", ".join(f"{k}: ours {a!r}, checkpoint {b!r}" for k, (a, b) in sorted(differ.items())))
    loaded = load_policy(source)
    if rfsq_dir.exists():
        shutil.rmtree(rfsq_dir)
    shutil.copytree(source / RFSQ_DIR, rfsq_dir)
    previous = source / "training.json"
    history = json.loads(previous.read_text()) if previous.is_file() else {}
    start = {k: history.get(k) for k in ("command", "data", "data_fingerprint")}
    if "averaged_from" in history:       # an average (scripts/average_checkpoints.py): keep its sources
        start["averaged_from"] = history["averaged_from"]
    lineage = [start] + history.get("init_lineage", [])
    metrics = {"copied_from": str(source), "val": history.get("rfsq_val"), "init_lineage": lineage}
    (rfsq_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[train_policy] starting from {source}: its weights, RFSQ tokenizer and proprio normalisation")
    return loaded, metrics


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)        # a kill mid-write leaves the previous state intact


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    return {name: version(name) for name in ("torch", "transformers", "numpy", "safetensors")}


@torch.no_grad()
def evaluate_tokens(model, demos, index: torch.Tensor, batch_size: int = 64, offset_head=None) -> dict[str, Any]:
    """Teacher-forced cross-entropy and token accuracy per RFSQ layer on rows `index`; with
    `offset_head`, also the RMS error (cm) of its goal-object xy readout on the labelled rows (of
    the wrist head's too, `wrist_object_xy_rmse_cm`, where it has one)."""
    from rsd_ray.policy.training import GOAL_OFFSET_SCALE_M, labelled_rows, teacher_forced_logits, token_losses

    model.eval()
    ce_sum = acc_sum = 0.0
    sq_err_per_head: list[float] = []       # goal-object xy, one per 6-wide prediction (agentview, wrist)
    num_labelled = 0
    for lo in range(0, len(index), batch_size):
        idx = index[lo:lo + batch_size]
        images, ids, mask, proprio, tokens = demos.batch(idx)
        logits, h0 = teacher_forced_logits(model, images, ids, mask, proprio, tokens)
        ce, acc = token_losses(logits, tokens)
        ce_sum = ce_sum + ce * len(idx)
        acc_sum = acc_sum + acc * len(idx)
        if offset_head is not None:
            offsets = demos.goal_offsets[idx]
            labelled = labelled_rows(offsets)
            if labelled.any():
                head_inputs = offset_head.inputs(model, images, ids, proprio, h0)
                pred = offset_head(*(x[labelled] for x in head_inputs)) * GOAL_OFFSET_SCALE_M
                per_head = pred.unflatten(1, (-1, 6))[:, :, :2] - offsets[labelled, None, :2]   # [n, heads, 2]
                errors = per_head.square().sum(dim=(0, 2)).tolist()
                sq_err_per_head = [a + b for a, b in zip(sq_err_per_head, errors)] if sq_err_per_head else errors
                num_labelled += int(labelled.sum())
    model.train()
    n = max(1, len(index))
    out = {"ce": float((ce_sum / n).mean()), "ce_per_layer": [round(float(v), 4) for v in ce_sum / n],
           "acc_per_layer": [round(float(v), 4) for v in acc_sum / n]}
    if num_labelled:
        for key, sq_err in zip(("object_xy_rmse_cm", "wrist_object_xy_rmse_cm"), sq_err_per_head):
            out[key] = round(100 * (sq_err / num_labelled) ** 0.5, 3)
    return out


@torch.no_grad()
def action_errors(model, tokenizer, demos, index: torch.Tensor, gold_chunks: torch.Tensor,
                  batch_size: int = 64) -> dict[str, float]:
    """Greedy `autoregressive` decoding on rows `index` -> decoded chunk vs the demonstration's
    chunk (raw env units): MSE, and the fraction of gripper signs that agree."""
    from rsd_ray.decoding.modes import DecodeEngine, DecodeSettings

    model.eval()
    engine = DecodeEngine(model, None, DecodeSettings(mode="autoregressive", num_slots=batch_size))
    decoded = []
    for lo in range(0, len(index), batch_size):
        images, ids, mask, proprio, _ = demos.batch(index[lo:lo + batch_size])
        prefix, pmask = model.encode_prefix(images, ids, mask, proprio)
        decoded.append(tokenizer.decode(engine.run(prefix, pmask).tokens).cpu())
    model.train()
    pred, gold = torch.cat(decoded), gold_chunks[index]                                   # [n, T, A]
    return {"action_mse": float((pred - gold).pow(2).mean()),
            "arm_mse": float((pred[..., :6] - gold[..., :6]).pow(2).mean()),
            "gripper_sign_agreement": float((torch.sign(pred[..., 6]) == torch.sign(gold[..., 6])).float().mean())}


def plot_curve(history: list[dict[str, Any]], draft_history: list[dict[str, Any]], path: str, title: str,
               keep_best: bool = True) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    train = [h for h in history if "train_ce" in h]
    val = [h for h in history if "val_ce" in h]
    axes[0].plot([h["step"] for h in train], [h["train_ce"] for h in train], label="train CE (mean of L layers)", alpha=0.6)
    if val:
        axes[0].plot([h["step"] for h in val], [h["val_ce"] for h in val], "o-", label="val CE (mean of L layers)")
        if any("val_loss" in h for h in val):
            axes[0].plot([h["step"] for h in val if "val_loss" in h], [h["val_loss"] for h in val if "val_loss" in h],
                         "s-", label="val CE weighted per layer" + (" (selects the kept weights)" if keep_best else ""))
        for layer in (0, 1):     # the coarse layers carry the action; the fine ones are near noise
            axes[0].plot([h["step"] for h in val], [h["val_ce_per_layer"][layer] for h in val], ".--",
                         label=f"val CE layer {layer}")
    axes[0].axhline(math.log(7), color="grey", ls=":", label="uniform (log 7)")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("cross-entropy (nats)"), axes[0].legend(fontsize=7, loc="upper right")
    if val:
        acc = np.array([h["val_acc_per_layer"] for h in val])
        for layer in range(acc.shape[1]):
            axes[1].plot([h["step"] for h in val], acc[:, layer], label=f"layer {layer}")
        axes[1].set_xlabel("step"), axes[1].set_ylabel("val token accuracy"), axes[1].legend(fontsize=7)
    if draft_history:
        axes[2].plot([h["step"] for h in draft_history], [h["draft_ce"] for h in draft_history])
        axes[2].set_xlabel("draft step"), axes[2].set_ylabel("draft CE (mean of its trained layers)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_policy(config: TrainPolicyConfig, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) every phase; write the checkpoint and the results; return the results dict."""
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_rfsq import TrainRFSQConfig, train_rfsq

    from rsd_ray.policy.checkpoint import ProprioStats, save_policy
    from rsd_ray.policy.draft import DraftModel
    from rsd_ray.policy.modeling_rsd import RSDModel
    from rsd_ray.policy.training import (action_chunks, build_demo_tensors, check_instructions, drop_cameras,
                                         draft_teacher_forced_logits, goal_offset_loss, main_model_targets,
                                         labelled_rows, proprio_stats, samples_fingerprint, sort_samples,
                                         teacher_forced_logits, token_losses)

    torch.set_num_threads(config.num_threads)
    wall_start = time.perf_counter()
    work = config.resolved_work_dir
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    if state_path.exists() and not config.resume:
        raise FileExistsError(f"{state_path} exists; pass --resume=true to continue it, or delete {work} to start over")
    state = torch.load(state_path, weights_only=False) if config.resume and state_path.exists() else None

    # ---- data -----------------------------------------------------------------------------
    table = sort_samples(load_samples(config.data, config.replace_tasks_from))
    if table.num_rows == 0:
        raise ValueError(f"train_policy: no samples in {config.data}; expected run directories with samples/ "
                         f"(jobs/collect_demos.py)")
    fingerprint = samples_fingerprint(table)
    check_instructions(table.column("instruction").to_pylist(), config.model.max_instruction_tokens)
    if state is not None and state["data_fingerprint"] != fingerprint:
        raise ValueError(f"train_policy --resume: the data's fingerprint is {fingerprint}; the saved state in {work} "
                         f"was trained on {state['data_fingerprint']}. Same --data, or a fresh work_dir")
    chunks = action_chunks(table)                                                      # [N, T, A]
    # (run, key): collections on perturbed starts reuse the evaluation's keys, one key per run
    num_episodes = len(set(zip(table.column("run_id").to_pylist(), table.column("episode_key").to_pylist())))
    print(f"[train_policy] {table.num_rows} samples from {num_episodes} episodes, data fingerprint {fingerprint}")

    # ---- phase 1: RFSQ tokenizer ---------------------------------------------------------
    rfsq_dir = work / "rfsq"
    init = None
    if config.init_from is not None and state is None:
        init, rfsq_metrics = _start_from_checkpoint(config, rfsq_dir)
    elif state is None or not (rfsq_dir / "config.json").exists():
        npy = work / "action_chunks.npy"
        np.save(npy, chunks)
        rfsq_metrics = train_rfsq(TrainRFSQConfig(out_dir=str(rfsq_dir), npy=str(npy), seed=config.seed,
                                                  steps=config.rfsq_steps, batch_size=config.rfsq_batch_size,
                                                  lr=config.rfsq_lr, warmup_steps=min(100, config.rfsq_steps // 10 + 1),
                                                  device=config.device, num_threads=config.num_threads,
                                                  progress=config.progress, rfsq=config.rfsq),
                                  chunks=chunks, command=command)
    else:
        rfsq_metrics = json.loads((rfsq_dir / "train_metrics.json").read_text())
    tokenizer = RFSQTokenizer.from_pretrained(rfsq_dir)
    if state is not None:
        proprio = ProprioStats(**state["proprio"])
    else:
        proprio = init.proprio if init is not None else proprio_stats(table)
    demos = build_demo_tensors(table, config.model, tokenizer, proprio)
    train_idx, val_idx = _split(demos.episode_keys, config.val_fraction, config.seed)
    gold_chunks = torch.from_numpy(chunks)

    # ---- phase 2: main model --------------------------------------------------------------
    torch.manual_seed(config.seed)
    model, draft = RSDModel(config.model), DraftModel(config.model)
    if init is not None:
        missing, unexpected = model.load_state_dict(init.model.state_dict(), strict=False)
        pooled_now = config.model.instruction_pool_tokens and not init.config.instruction_pool_tokens
        grown = GROWN_PREFIXES + ((REPLACED_PREFIX,) if pooled_now else ())
        not_grown = [k for k in missing if not k.startswith(grown)]
        unexpected = [k for k in unexpected if not (pooled_now and k in DROPPED_KEYS)]
        if pooled_now:
            print("[train_policy] the instruction is pooled now: a fresh InstructionPooler replaces the checkpoint's "
                  "byte embedding; every other weight is the checkpoint's")
        if not_grown or unexpected:
            raise ValueError(f"train_policy: init_from={config.init_from!r} does not fit the model: "
                             f"missing {not_grown}, unexpected {unexpected}")
        draft.load_state_dict(init.draft.state_dict())
    offset_head = None
    if config.goal_offset_weight > 0:
        num_labelled = int(labelled_rows(demos.goal_offsets[train_idx]).sum())
        if num_labelled == 0:
            raise ValueError(f"train_policy: goal_offset_weight={config.goal_offset_weight} but no training sample "
                             f"in {config.data} has goal_offsets; record demonstrations with this version's "
                             f"jobs/collect_demos.py (privileged state), or set goal_offset_weight=0")
        print(f"[train_policy] goal-offset auxiliary loss (weight {config.goal_offset_weight}, from "
              f"{config.goal_offset_source}) on {num_labelled} of {len(train_idx)} training samples")
        offset_head = make_offset_head(config, torch.unique(demos.instruction_ids, dim=0))
    trained = list(model.parameters()) + (list(offset_head.parameters()) if offset_head is not None else [])
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    ema = ema_model(model, config.ema_decay) if config.ema_decay > 0 else None
    scored = model if ema is None else ema.module     # the weights validated, selected and shipped
    history: list[dict[str, Any]] = []
    draft_history: list[dict[str, Any]] = []
    step, phase, main_s = 0, "main", 0.0
    weights = config.layer_weight_tensor()                                             # [L]
    best: dict[str, Any] | None = None       # {"step", "val_loss", "model"}: lowest weighted val CE so far
    if state is not None:
        model.load_state_dict(state["model"])
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        if offset_head is not None:
            if state.get("goal_offset_head") is None:
                raise ValueError(f"train_policy --resume: {state_path} was saved without goal_offset_weight; resume "
                                 f"with the same --goal_offset_weight as the run that wrote it")
            offset_head.load_state_dict(state["goal_offset_head"])
        if ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"train_policy --resume: {state_path} was saved without ema_decay; resume with "
                                 f"the same --ema_decay as the run that wrote it")
            ema.load_state_dict(state["ema"])
        step, phase, history, draft_history = state["step"], state["phase"], state["history"], state["draft_history"]
        main_s = state.get("main_s", 0.0)
        best = state.get("best")
        print(f"[train_policy] resumed {state_path}: phase {phase}, step {step}")

    def snapshot(draft_optimizer=None, draft_step: int = 0) -> dict[str, Any]:
        return {"model": model.state_dict(), "draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "goal_offset_head": offset_head.state_dict() if offset_head is not None else None,
                "draft_optimizer": draft_optimizer.state_dict() if draft_optimizer is not None else None,
                "draft_step": draft_step, "step": step, "phase": phase, "history": history,
                "draft_history": draft_history, "data_fingerprint": fingerprint, "main_s": main_s, "best": best,
                "proprio": {"q01": proprio.q01, "q99": proprio.q99}, "config": asdict(config)}

    stopped_early = False
    cut_at = None                    # main step at which max_minutes ended the phase
    if phase == "main":
        model.train()
        bar = tqdm(range(step, config.steps), initial=step, total=config.steps, desc="train_policy main",
                   disable=not config.progress, mininterval=2.0)
        t_phase = time.perf_counter() - main_s
        for step in bar:
            # per-step seeded batches: a resumed run draws the batches an uninterrupted one would
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            idx = train_idx[torch.randint(len(train_idx), (config.batch_size,), generator=gen)]
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, config.steps, config.lr, config.warmup_steps)
            images, ids, mask, prop, tokens = demos.batch(idx, config.shift_px_per_camera or config.shift_px, gen)
            if config.camera_dropout:
                images = drop_cameras(images, config.camera_dropout, gen)
            logits, h0 = teacher_forced_logits(model, images, ids, mask, prop, tokens)
            ce, acc = token_losses(logits, tokens)
            loss = (ce * weights).sum()
            if offset_head is not None:
                offset_mse, _ = goal_offset_loss(offset_head, offset_head.inputs(model, images, ids, prop, h0),
                                                 demos.goal_offsets[idx])
                loss = loss + config.goal_offset_weight * offset_mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            row: dict[str, Any] = {"step": step + 1, "train_ce": round(float(ce.detach().mean()), 5),
                                   "train_loss": round(float(loss.detach()), 5),
                                   "train_ce_layer0": round(float(ce[0].detach()), 5)}
            if offset_head is not None:
                row["train_offset_mse"] = round(float(offset_mse.detach()), 5)
            done = step + 1
            main_s = time.perf_counter() - t_phase
            out_of_time = config.max_minutes is not None and main_s > 60 * config.max_minutes
            if done % config.eval_every == 0 or done == config.steps or out_of_time:
                if len(val_idx):
                    ev = evaluate_tokens(scored, demos, val_idx, offset_head=offset_head)
                    row.update(val_ce=ev["ce"], val_ce_per_layer=ev["ce_per_layer"], val_acc_per_layer=ev["acc_per_layer"])
                    for key in ("object_xy_rmse_cm", "wrist_object_xy_rmse_cm"):
                        if key in ev:
                            row[f"val_{key}"] = ev[key]
                    row["val_loss"] = float((torch.tensor(ev["ce_per_layer"]) * weights).sum())
                    if config.keep_best and (best is None or row["val_loss"] < best["val_loss"]):
                        best = {"step": done, "val_loss": row["val_loss"],
                                "model": {k: v.detach().clone() for k, v in scored.state_dict().items()}}
                row["wall_s"] = round(main_s, 1)
            history.append(row)
            bar.set_postfix(ce=f"{row['train_ce']:.3f}", ce0=f"{row['train_ce_layer0']:.3f}", val=f"{row.get('val_ce', float('nan')):.3f}")
            step = done
            if done % config.save_every == 0 or done == config.steps or out_of_time:
                _save_state(state_path, snapshot())
            if out_of_time:
                cut_at = done
                stopped_early = done < config.steps and config.on_max_minutes == "stop"
                print(f"[train_policy] main phase cut at step {done}/{config.steps}: max_minutes={config.max_minutes} "
                      + ("reached; state saved, --resume=true with a larger max_minutes continues" if stopped_early
                         else "reached; going on to the draft"))
                break
        bar.close()
        if not stopped_early:
            if best is not None:
                model.load_state_dict(best["model"])
                print(f"[train_policy] main phase ends with the {'EMA ' if ema is not None else ''}weights of "
                      f"step {best['step']} (weighted val CE {best['val_loss']:.4f}, the lowest)")
            elif ema is not None:
                model.load_state_dict(ema.module.state_dict())
                print(f"[train_policy] main phase ends with the EMA weights (decay {config.ema_decay})")
            phase = "draft"
            _save_state(state_path, snapshot())

    # ---- phase 3: draft -------------------------------------------------------------------
    draft_s = 0.0
    K = config.draft_train_layers or config.model.draft_max_layers
    if phase == "draft" and not stopped_early:
        t_draft = time.perf_counter()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        hidden, main_tokens = main_model_targets(model, demos, K)                       # [N, T, H], [N, T, D, K]
        targets = main_tokens if config.draft_target == "main" else demos.tokens[..., :K]
        draft_opt = torch.optim.AdamW(draft.parameters(), lr=config.draft_lr, weight_decay=config.weight_decay)
        first = 0
        if state is not None and state.get("draft_optimizer") is not None:
            draft_opt.load_state_dict(state["draft_optimizer"])
            first = state["draft_step"]
        draft.train()
        bar = tqdm(range(first, config.draft_steps), initial=first, total=config.draft_steps,
                   desc="train_policy draft", disable=not config.progress, mininterval=2.0)
        for dstep in bar:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + 7 + dstep)
            idx = train_idx[torch.randint(len(train_idx), (config.draft_batch_size,), generator=gen)]
            for group in draft_opt.param_groups:
                group["lr"] = _lr(dstep, config.draft_steps, config.draft_lr, min(50, config.draft_steps // 10 + 1))
            logits = draft_teacher_forced_logits(draft, hidden[idx], targets[idx])      # [B, T, D, K, V]
            ce, _ = token_losses(logits, targets[idx])
            loss = ce.mean()
            draft_opt.zero_grad(set_to_none=True)
            loss.backward()
            draft_opt.step()
            draft_history.append({"step": dstep + 1, "draft_ce": round(float(loss.detach()), 5)})
            bar.set_postfix(ce=f"{draft_history[-1]['draft_ce']:.3f}")
            if (dstep + 1) % config.save_every == 0:
                _save_state(state_path, snapshot(draft_opt, dstep + 1))
        bar.close()
        phase = "done"
        draft_s = time.perf_counter() - t_draft
        _save_state(state_path, snapshot(draft_opt, config.draft_steps))

    # ---- write the checkpoint and the results ---------------------------------------------
    model.eval()
    draft.eval()
    final: dict[str, Any] = {"phase": phase, "step": step, "stopped_early": stopped_early, "main_cut_at_step": cut_at,
                             "weights_from_step": best["step"] if best is not None else step}
    eval_idx = val_idx if len(val_idx) else train_idx
    final["eval_rows"] = "val" if len(val_idx) else "train"
    final.update({f"tokens_{k}": v for k, v in evaluate_tokens(model, demos, eval_idx).items()})
    final.update(action_errors(model, tokenizer, demos, eval_idx, gold_chunks))
    if phase == "done":
        with torch.no_grad():
            hidden, main_tokens = main_model_targets(model, demos.subset(eval_idx), K)
            proposed, _ = draft.propose(hidden, K)
        # layer k is accepted under `exact` only if all T*D tokens of layers <= k match
        match = (proposed == main_tokens).flatten(1, 2).all(dim=1)                     # [n, K]
        final["draft_token_agreement_per_layer"] = [round(float(v), 4) for v in
                                                    (proposed == main_tokens).float().mean(dim=(0, 1, 2))]
        final["draft_exact_prefix_layers_mean"] = float(match.int().cumprod(dim=1).sum(dim=1).float().mean())
    out_dir = Path(config.out_dir)
    if phase == "done":
        if out_dir.exists():
            shutil.rmtree(out_dir)            # a stale file would change the checkpoint hash
        save_policy(out_dir, model, draft, tokenizer, proprio)
    results = {"checkpoint": str(out_dir) if phase == "done" else None, "command": command,
               "data": list(config.data), "replace_tasks_from": list(config.replace_tasks_from),
               "data_fingerprint": fingerprint, "num_samples": table.num_rows,
               "num_episodes": num_episodes, "num_train_rows": len(train_idx), "num_val_rows": len(val_idx),
               "rfsq_fingerprint": tokenizer.fingerprint(), "rfsq_val": rfsq_metrics.get("val"),
               # how the checkpoint this run started from was trained (newest first): with the
               # command above, enough to rebuild this one
               "init_lineage": rfsq_metrics.get("init_lineage", []),
               "main_s": round(main_s, 1), "draft_s": round(draft_s, 1),
               "total_wall_s_this_invocation": round(time.perf_counter() - wall_start, 1),
               "num_parameters": sum(p.numel() for p in model.parameters()),
               "num_draft_parameters": sum(p.numel() for p in draft.parameters()),
               "final": final, "history": history, "draft_history": draft_history,
               "config": asdict(config), "versions": _versions(), "threads": torch.get_num_threads()}
    prefix = config.resolved_results_prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curve(history, draft_history, prefix + ".png", f"train_policy {out_dir.name}: {table.num_rows} samples, "
               f"{num_episodes} episodes, data {fingerprint}", keep_best=config.keep_best)
    if phase == "done":
        small = {k: v for k, v in results.items() if k not in ("history", "draft_history")}
        (out_dir / "training.json").write_text(json.dumps(small, indent=2) + "\n")
        (out_dir / "README.md").write_text(_readme(results, config))
    return results


def _replaced_text(results: dict[str, Any]) -> str:
    runs = results.get("replace_tasks_from") or []
    return f"; the tasks of {', '.join(runs)} only from those runs (replace_tasks_from)" if runs else ""


def _lineage_text(lineage: list[dict[str, Any]]) -> str:
    if not lineage:
        return ""
    lines = ["Fine-tuned (`--init_from`) from a checkpoint trained by, newest first:", ""]
    for item in lineage:
        lines += [f"- `{item.get('command')}` (data fingerprint `{item.get('data_fingerprint')}`)"]
        for source in item.get("averaged_from", []):
            training = source.get("training") or {}
            lines += [f"  - averaged from `{source['path']}`, trained by `{training.get('command')}` "
                      f"(data fingerprint `{training.get('data_fingerprint')}`)"]
    return "\n".join(lines) + "\n\n"


def _readme(results: dict[str, Any], config: TrainPolicyConfig) -> str:
    f = results["final"]
    m = config.model
    stem = f" + a residual CNN stem of width {m.conv_stem_channels}" if m.conv_stem_channels else ""
    if m.motion_feedback_dim:
        stem += (", motion feedback (the previous chunk's commanded vs achieved translation, "
                 "`rsd_ray/policy/motion_feedback.py`) added to the proprio token")
    if m.keypoints:
        stem += f", {m.keypoints} spatial-softmax keypoints per camera added to the proprio token"
    instruction = (f"{m.max_instruction_tokens} instruction bytes pooled into {m.instruction_pool_tokens} positions"
                   if m.instruction_pool_tokens else f"{m.max_instruction_tokens} instruction bytes")
    kept_because = "lowest weighted val CE" if config.keep_best else "the last step: keep_best=false"
    if config.ema_decay:
        kept_because = f"an exponential moving average of the weights, decay {config.ema_decay}; " + kept_because
    cut = (f" (cut by max_minutes at {f['main_cut_at_step']})" if f.get('main_cut_at_step') is not None
           else "")
    crop = (f" (agentview cropped to rows {m.agentview_crop[0]:g}-{m.agentview_crop[2]:g}, columns "
            f"{m.agentview_crop[1]:g}-{m.agentview_crop[3]:g} of the frame first)" if m.agentview_crop else "")
    return f"""# RSD policy checkpoint `{Path(config.out_dir).name}`

Trained in-project by `jobs/train_policy.py` on demonstrations of the scripted expert
(`jobs/collect_demos.py`). Load with `RSDPolicy.from_pretrained(dir)` or
`python jobs/eval_libero.py --policy.kind=rsd --policy.checkpoint={config.out_dir}`.

## Exact training command

```
{results['command']}
```

{_lineage_text(results.get('init_lineage', []))}## Data

- run directories: {', '.join(results['data'])}{_replaced_text(results)}
- data fingerprint (`rsd_ray.policy.training.samples_fingerprint`): `{results['data_fingerprint']}`
- {results['num_samples']} samples (chunk boundaries) from {results['num_episodes']} successful episodes;
  {results['num_train_rows']} train rows, {results['num_val_rows']} held-out rows (split by episode, seed {config.seed})

## Model

{results['num_parameters']:,} parameters (+ draft {results['num_draft_parameters']:,}): images {m.image_size}x{m.image_size}{crop}
in {m.patch_size}x{m.patch_size} patches{stem}, {instruction}, Llama backbone
{m.num_hidden_layers} blocks x hidden {m.hidden_size}; RFSQ tokenizer fingerprint `{results['rfsq_fingerprint']}`.
The `parallel` decoding mode's query blocks are NOT trained: use `autoregressive` or `speculative`.

## Figures at the end of training ({f['eval_rows']} rows)

- teacher-forced cross-entropy per RFSQ layer: {f.get('tokens_ce_per_layer')}
- token accuracy per RFSQ layer: {f.get('tokens_acc_per_layer')}
- autoregressive decode vs demonstration: action MSE {f.get('action_mse', float('nan')):.4g}, arm MSE
  {f.get('arm_mse', float('nan')):.4g}, gripper sign agreement {f.get('gripper_sign_agreement', float('nan')):.3f}
- draft vs main greedy tokens, agreement per layer: {f.get('draft_token_agreement_per_layer')};
  mean exact-accepted prefix (layers) {f.get('draft_exact_prefix_layers_mean')}
- main phase: {f['step']} of {config.steps} steps{cut}, batch {config.batch_size};
  weights kept from step {f.get('weights_from_step')} ({kept_because}; CE weighted per layer by {config.layer_weights})
- wall: main {results['main_s']} s, draft {results['draft_s']} s ({results['threads']} torch thread(s), CPU)
"""


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import parse_or_exit

    config = parse_or_exit(TrainPolicyConfig, argv)
    args = sys.argv[1:] if argv is None else argv
    results = train_policy(config, command=shlex.join(["python", "jobs/train_policy.py", *args]))
    f = results["final"]
    print(f"[train_policy] final ({f['eval_rows']}): CE per layer {f['tokens_ce_per_layer']}")
    print(f"[train_policy] action MSE {f['action_mse']:.4g}, gripper sign agreement {f['gripper_sign_agreement']:.3f}")
    if results["checkpoint"]:
        print(f"[train_policy] wrote {results['checkpoint']} and {config.resolved_results_prefix}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
