"""Record demonstrations: the scripted expert through the evaluator, on perturbed start states.

    python jobs/collect_demos.py --suites='[libero_spatial]' --task_ids='[0,1,2]' --num_trials=10
    python jobs/collect_demos.py --first_trial=10 --num_trials=20 --init_perturbation_m=0.015 \
        --layout_seed=75 --num_env_actors=2 --output_dir=runs/demos

Each suite becomes one normal run directory `<output_dir>/<run_name>-<suite>` (Ray actors,
records, resume: re-running the same command only runs the missing episodes). Its `samples/`
Parquet files are the dataset: one row per chunk boundary of every *successful* episode
(images, proprio, instruction, the expert's action chunk; SAMPLE_SCHEMA), read with
`rsd_ray.records.writer.read_samples`. The env renders only at chunk boundaries, the only
steps whose images a sample holds.

With `action_noise_std` > 0 the executed actions are perturbed (DART) while each sample keeps
the expert's clean chunk for the state it actually saw.

With `learner=CKPT` (takeover, DAgger-style; rsd_ray/policy/takeover.py) that RSD checkpoint
drives each episode's first S chunks (S uniform in `takeover_chunks`) and the expert takes
over from the state the learner left; only the expert's chunks become samples, so the data
holds the expert's corrections from states the learned policy actually reaches:

    python jobs/collect_demos.py --learner=checkpoints/default_policy --run_name=takeover \
        --first_trial=0 --num_trials=20 --action_noise_std=0.1

Movable objects are shifted by N(0, init_perturbation_m) metres after the trial's init state,
drawn from (task, trial, layout_seed), so the demonstrations start away from the fixed
evaluation states and each layout seed gives new ones; pick `first_trial` so that
the evaluation trials you report are not among the collected ones either.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


@dataclass
class CollectDemosConfig:
    suites: list[str] = field(default_factory=lambda: ["libero_spatial"])
    task_ids: list[int] | None = None      # None: every task of each suite
    first_trial: int = 10                  # trials first_trial.. (init state i, then perturbed)
    num_trials: int = 20
    init_perturbation_m: float = 0.015     # > 0: start states differ from the evaluation's
    # New start layouts for each value. Unset, the shifts depend on (task, trial) only, as in runs
    # recorded before this option: `seed` then changes nothing an expert without noise does, and
    # a clean run repeats every earlier clean run of the same trials episode for episode.
    layout_seed: int | None = None
    # > 0: DART. Executed actions get N(0, this) on the translation dims; samples keep the
    # expert's clean chunk, so the policy also learns how the expert recovers from drift.
    action_noise_std: float = 0.0
    # An RSD checkpoint: it drives chunks 0..S-1 of each episode and the expert takes over
    # (takeover demonstrations); None: the expert drives whole episodes.
    learner: str | None = None
    takeover_chunks: list[int] = field(default_factory=lambda: [1, 14])
    output_dir: str = "runs/demos"
    run_name: str = "demos"                # run directories are <run_name>-<suite>
    num_env_actors: int | None = None      # None: one per CPU
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        from rsd_ray.protocol import check_suite
        if not self.suites:
            raise ValueError("collect_demos: suites=[]; expected at least one LIBERO suite")
        for suite in self.suites:
            check_suite(suite)
        if self.init_perturbation_m <= 0:
            raise ValueError(f"collect_demos: init_perturbation_m={self.init_perturbation_m}; expected > 0 so the "
                             f"demonstrations do not start from the evaluation trials' init states")
        # The evaluator's configs check every env and policy field (layout seed, trials, learner
        # directory): one rule in one place, and bad input stops before Ray starts.
        self.eval_config(self.suites[0])

    def eval_config(self, suite: str):
        """The evaluator config that records this suite's demonstrations."""
        from rsd_ray.config import ClusterConfig, DecodeConfig, EnvConfig, EvalConfig, PolicyConfig, RecordsConfig
        # The expert's runs keep the default decode config (part of their identity, so that
        # re-running an older command resumes its directory); a learner decodes greedily and
        # autoregressively, the chunks evaluation reports.
        policy, decode = PolicyConfig(kind="expert"), DecodeConfig()
        if self.learner is not None:
            policy = PolicyConfig(kind="takeover", checkpoint=self.learner, takeover_chunks=self.takeover_chunks)
            decode = DecodeConfig(mode="autoregressive")
        return EvalConfig(
            env=EnvConfig(suite=suite, task_ids=self.task_ids, first_trial=self.first_trial,
                          num_trials=self.num_trials, init_perturbation_m=self.init_perturbation_m,
                          init_layout_seed=self.layout_seed,
                          action_noise_std=self.action_noise_std, cameras="on"),
            policy=policy, decode=decode,
            records=RecordsConfig(output_dir=self.output_dir, run_name=f"{self.run_name}-{suite}",
                                  record_chunks=False, record_samples="success"),
            cluster=ClusterConfig(num_env_actors=self.num_env_actors, show_progress=self.show_progress),
            seed=self.seed)


def collect_demos(config: CollectDemosConfig) -> list[dict[str, Any]]:
    """Run every suite; return one row per suite: run_dir, episodes, successes, samples."""
    from rsd_ray.driver import run_eval
    from rsd_ray.records.writer import read_samples

    rows = []
    for suite in config.suites:
        summary = run_eval(config.eval_config(suite))
        samples = read_samples([summary.run_dir])
        rows.append({"suite": suite, "run_dir": str(summary.run_dir), "num_episodes": summary.num_episodes,
                     "num_demos": summary.num_success, "num_samples": samples.num_rows})
    return rows


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import parse_or_exit

    config = parse_or_exit(CollectDemosConfig, argv)
    if config.layout_seed is None and config.action_noise_std == 0 and config.learner is None:
        print("collect_demos: no --layout_seed and no noise: these episodes repeat every earlier clean run of "
              "the same trials exactly; pass --layout_seed=N for new start layouts", file=sys.stderr)
    rows = collect_demos(config)
    print(f"{'suite':<16} {'episodes':>8} {'demos':>6} {'samples':>8}  run_dir")
    for r in rows:
        print(f"{r['suite']:<16} {r['num_episodes']:>8} {r['num_demos']:>6} {r['num_samples']:>8}  {r['run_dir']}")
    print("train on them with: python jobs/train_policy.py --data='[" + ",".join(r["run_dir"] for r in rows) + "]'")
    return 0 if sum(r["num_demos"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
