"""Configuration dataclasses only. One tree, `EvalConfig`, set from the command line by dotted
flags (`--env.suite=libero_object --decode.acceptance=threshold:0.9`). Protocol values default
from `protocol.py`; the whole tree goes into the run manifest.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rsd_ray.protocol import (
    CHUNK_STEPS, NOOP_ACTION, NUM_INIT_STATES, NUM_RFSQ_LAYERS, NUM_WAIT_STEPS,
    POLICY_IMAGE_SIZE, RENDER_SIZE, SUITES, check_suite,
)

# The RSD policy trained in-project on the scripted expert's demonstrations (issue 9): what
# `jobs/eval_libero.py` runs when no policy is named. Resolved from the checkout, not the cwd.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default_policy"

DECODING_MODES = ("parallel", "autoregressive", "speculative")
POLICY_KINDS = ("noop", "random", "expert", "rsd", "fault", "takeover")
# Kinds that load an RSD checkpoint (and so need a device and a checkpoint directory).
CHECKPOINT_POLICY_KINDS = ("rsd", "takeover")


@dataclass
class EnvConfig:
    suite: str = "libero_spatial"
    task_ids: list[int] | None = None     # None: every task of the suite
    num_trials: int = 50                  # trials per task; trial i uses init state i
    first_trial: int = 0
    num_wait_steps: int = NUM_WAIT_STEPS
    max_steps: int | None = None          # None: the suite's protocol value
    noop_action: list[float] = field(default_factory=lambda: list(NOOP_ACTION))
    render_size: int = RENDER_SIZE
    image_size: int = POLICY_IMAGE_SIZE   # env-side resize after the 180-degree rotation
    # Demonstrations only: shift movable objects by N(0, this) metres after the init state,
    # so recorded episodes start away from the evaluation trials' states. 0 for evaluation.
    init_perturbation_m: float = 0.0
    # Which shifts: None draws them from (task, trial) alone, so every run of the same trials gets
    # the same start layouts whatever its seed (runs recorded before this option); an int adds
    # itself to that key, so each value (>= 1) gives new layouts around the same init states.
    init_layout_seed: int | None = None
    # Demonstrations only (DART): add N(0, this) to the translation dims of every *executed*
    # action while samples keep the policy's clean chunk, so the data shows the expert
    # recovering from the small drifts a learned policy makes. 0 for evaluation.
    action_noise_std: float = 0.0
    # Receding horizon: execute the first N actions of each chunk, then ask the policy again from
    # the newer observation. CHUNK_STEPS (the default) is OpenVLA-OFT's open-loop protocol; fewer
    # closes the loop more often (more policy calls and renders per episode).
    execute_steps: int = CHUNK_STEPS
    # Speed options that leave every policy input and outcome bit-identical (tests prove it).
    skip_unused_renders: bool = True      # render only steps whose observation is used
    reuse_env: bool = True                # keep the env across trials of a task (soft reset)
    mujoco_gl: str = "egl"                # egl or osmesa (both software-render on a CPU)
    cameras: str = "auto"                 # auto: off for privileged policies that read no pixels; on; off

    def __post_init__(self) -> None:
        check_suite(self.suite)
        if self.num_trials < 1:
            raise ValueError(f"env.num_trials={self.num_trials}; expected >= 1")
        if not 0 <= self.first_trial or self.first_trial + self.num_trials > NUM_INIT_STATES:
            raise ValueError(f"env.first_trial={self.first_trial} + env.num_trials={self.num_trials} exceeds the "
                             f"{NUM_INIT_STATES} fixed init states of a LIBERO task")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"env.max_steps={self.max_steps}; expected >= 1 or unset for the suite's value")
        if len(self.noop_action) != 7:
            raise ValueError(f"env.noop_action has {len(self.noop_action)} values; expected 7")
        if not 0.0 <= self.init_perturbation_m <= 0.1:
            raise ValueError(f"env.init_perturbation_m={self.init_perturbation_m}; expected 0..0.1 (metres)")
        if self.init_layout_seed is not None and self.init_layout_seed < 1:
            # 0 is refused because numpy's SeedSequence ignores trailing zeros: the key with 0 appended
            # draws the unset layouts again.
            raise ValueError(f"env.init_layout_seed={self.init_layout_seed}; expected >= 1 or unset (0 would repeat "
                             f"the unset layouts)")
        if self.init_layout_seed is not None and self.init_perturbation_m <= 0:
            raise ValueError(f"env.init_layout_seed={self.init_layout_seed} has no effect with init_perturbation_m=0; "
                             f"set a perturbation or leave the seed unset")
        if not 0.0 <= self.action_noise_std <= 1.0:
            raise ValueError(f"env.action_noise_std={self.action_noise_std}; expected 0..1 (in action units)")
        if not 1 <= self.execute_steps <= CHUNK_STEPS:
            raise ValueError(f"env.execute_steps={self.execute_steps}; expected 1..{CHUNK_STEPS} (actions per chunk)")
        if self.cameras not in ("auto", "on", "off"):
            raise ValueError(f"env.cameras={self.cameras!r}; expected auto, on or off")
        if self.mujoco_gl not in ("egl", "osmesa"):
            raise ValueError(f"env.mujoco_gl={self.mujoco_gl!r}; expected 'egl' or 'osmesa'")


@dataclass
class DecodeConfig:
    mode: str = "speculative"             # parallel / autoregressive / speculative
    draft_layers: int = 3                 # K: RFSQ layers the draft proposes
    acceptance: str = "exact"             # exact, or threshold:TAU (lossy)
    sample: bool = False                  # greedy (False) or sampled decoding
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decode.mode={self.mode!r}; expected one of {', '.join(DECODING_MODES)}")
        if not 1 <= self.draft_layers < NUM_RFSQ_LAYERS:
            raise ValueError(f"decode.draft_layers={self.draft_layers}; expected 1..{NUM_RFSQ_LAYERS - 1}")
        if self.acceptance != "exact":
            prefix, _, tau = self.acceptance.partition(":")
            try:
                ok = prefix == "threshold" and 0.0 <= float(tau) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"decode.acceptance={self.acceptance!r}; expected 'exact' or 'threshold:TAU' "
                                 f"with TAU in [0, 1], e.g. threshold:0.7")
        if self.temperature <= 0:
            raise ValueError(f"decode.temperature={self.temperature}; expected > 0")

    @property
    def lossless(self) -> bool:
        return self.mode != "speculative" or self.acceptance == "exact"


@dataclass
class PolicyConfig:
    kind: str = "rsd"                     # noop / random / expert / rsd / fault / takeover
    checkpoint: str | None = None         # local directory (rsd); None: the shipped default; no hub downloads
    device: str = "auto"                  # auto: cuda when the actor got a GPU, else cpu
    max_batch: int = 32                   # slots per policy call
    max_wait_ms: float = 5.0              # how long a partial batch waits for more requests
    # rsd: eager, static (fixed-shape passes run eagerly) or cuda_graph; auto = cuda_graph on a
    # GPU, eager on a CPU. Outputs are identical (tests/test_graphs.py), so it is not part of a
    # run's identity.
    graph_mode: str = "auto"
    fault: str = "nan"                    # kind=fault only: nan / wrong_shape / raise
    fault_at_chunk: int = 0
    # kind=takeover only (demonstrations, policy/takeover.py): the rsd checkpoint drives each
    # episode's chunks 0..S-1, the scripted expert the rest, S uniform in [first, last].
    takeover_chunks: list[int] = field(default_factory=lambda: [1, 14])

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy.kind={self.kind!r}; expected one of {', '.join(POLICY_KINDS)}")
        if len(self.takeover_chunks) != 2 or not 0 <= self.takeover_chunks[0] <= self.takeover_chunks[1]:
            raise ValueError(f"policy.takeover_chunks={self.takeover_chunks}; expected [first, last] with "
                             f"0 <= first <= last")
        if self.kind in CHECKPOINT_POLICY_KINDS:
            if not self.checkpoint:
                self.checkpoint = str(DEFAULT_CHECKPOINT)
            if not os.path.isdir(self.checkpoint):
                raise ValueError(f"policy.checkpoint={self.checkpoint!r} is not a directory")
        if self.graph_mode not in ("auto", "eager", "static", "cuda_graph"):
            raise ValueError(f"policy.graph_mode={self.graph_mode!r}; expected auto, eager, static or cuda_graph")
        if self.max_batch < 1:
            raise ValueError(f"policy.max_batch={self.max_batch}; expected >= 1")


@dataclass
class RecordsConfig:
    output_dir: str = "runs"
    run_name: str | None = None           # None: derived from suite, policy and decoding mode
    record_chunks: bool = True            # also write one row per action chunk
    # Training samples (images, proprio, instruction, action chunk) at every chunk boundary:
    # none, success (only from successful episodes: demonstrations) or all.
    record_samples: str = "none"

    def __post_init__(self) -> None:
        if self.record_samples not in ("none", "success", "all"):
            raise ValueError(f"records.record_samples={self.record_samples!r}; expected none, success or all")


@dataclass
class ClusterConfig:
    address: str | None = None            # None: start or join a local Ray; 'auto' inside `ray job submit`
    num_env_actors: int | None = None     # None: one per CPU the cluster has
    num_policy_actors: int = 1
    policy_num_gpus: float | None = None  # None: 1 if the cluster has a GPU, else 0
    policy_num_cpus: float = 0.0          # env actors claim every CPU; the policy shares
    max_attempts: int = 3                 # tries per episode before an error row is final
    env_actor_max_restarts: int = -1      # Ray restarts a dead env actor (-1: forever)
    env_actor_restart_timeout_s: float = 300.0  # a dead env actor not back by then is retired
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"cluster.max_attempts={self.max_attempts}; expected >= 1")
        if self.num_env_actors is not None and self.num_env_actors < 1:
            raise ValueError(f"cluster.num_env_actors={self.num_env_actors}; expected >= 1")
        if self.env_actor_restart_timeout_s <= 0:
            raise ValueError(f"cluster.env_actor_restart_timeout_s={self.env_actor_restart_timeout_s}; expected > 0")


@dataclass
class EvalConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0                         # per-episode seeds derive from it and the episode key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def protocol(self) -> dict[str, Any]:
        """The evaluation protocol: runs with equal protocols are comparable episode for episode
        (whatever policy or decoding mode they used)."""
        e = self.env
        protocol = {"num_wait_steps": e.num_wait_steps, "max_steps": e.max_steps, "noop_action": list(e.noop_action),
                    "render_size": e.render_size, "image_size": e.image_size, "chunk_steps": CHUNK_STEPS,
                    "init_perturbation_m": e.init_perturbation_m, "seed": self.seed}
        if e.action_noise_std > 0:
            # Only when set: runs recorded before this option have no such key and mean 0, and must
            # stay comparable with (and resumable by) runs made now.
            protocol["action_noise_std"] = e.action_noise_std
        if e.execute_steps != CHUNK_STEPS:
            protocol["execute_steps"] = e.execute_steps      # likewise: absent means the whole chunk
        if e.init_layout_seed is not None:
            protocol["init_layout_seed"] = e.init_layout_seed  # likewise: absent means the (task, trial) layouts
        return protocol

    def run_identity(self, checkpoint_hash: str) -> dict[str, Any]:
        """Everything that can change an outcome: the protocol plus the policy and its decoding.
        A run directory only ever holds episodes of one identity (the resume guard)."""
        d = self.decode
        return {**self.protocol(), "policy_kind": self.policy.kind, "checkpoint_hash": checkpoint_hash,
                "fault": f"{self.policy.fault}@{self.policy.fault_at_chunk}" if self.policy.kind == "fault" else None,
                **({"takeover_chunks": list(self.policy.takeover_chunks)} if self.policy.kind == "takeover" else {}),
                "decode_mode": d.mode, "draft_layers": d.draft_layers, "acceptance": d.acceptance,
                "sample": d.sample, "temperature": d.temperature}

    @property
    def run_name(self) -> str:
        if self.records.run_name:
            return self.records.run_name
        name = f"{self.env.suite}-{self.policy.kind}"
        if self.policy.kind == "rsd":
            name += f"-{self.decode.mode}"
            if self.decode.mode == "speculative":
                name += f"-k{self.decode.draft_layers}-{self.decode.acceptance.replace(':', '')}"
        return name


__all__ = ["EnvConfig", "DecodeConfig", "PolicyConfig", "RecordsConfig", "ClusterConfig", "EvalConfig",
           "SUITES", "DECODING_MODES", "POLICY_KINDS"]
