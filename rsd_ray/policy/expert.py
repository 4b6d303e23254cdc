"""A privileged scripted expert for LIBERO pick-and-place: reads poses, emits 8-step chunks.

The env side runs all T=8 actions of a chunk open loop, so the expert plans a chunk at a
time: it rolls a small model of the OSC_POSE arm forward (a setpoint delta of 0.05 m per unit
action, of which the eef covers ~25 % per step after a one-step lag; measured in the sim) and
computes each step's action from the *predicted* eef position, so a chunk converges on its
target without overshooting. Phase changes that only need the clock or the predicted pose
(gripper closed long enough, lift height reached, object over the target) happen inside a
chunk; those that need the measured pose (above the grasp point? at it? did the grasp hold?
did a descent or a lift stall on something?) happen at the boundary, because the arm settles
a few mm short of its setpoint under gravity and swings out ~1.5 cm on fast moves.

Phases, one episode: approach (above the grasp point) -> descend -> grasp (close) -> lift ->
carry (object over the target) -> place (lower) -> release (open) -> retreat; a failed grasp
or a dropped object sends the episode back to approach with fresh poses. Grasps: objects at
their box centre (slid clear of neighbours); bowls by a pinch of the rim, or, under an
overhang (in a drawer) or raised (on the cabinet), by an expanding grasp: fingers in closed,
then opened against the inner wall, so "hold" is the open command there.

Where the arm reaches far or high, OSC settles centimetres short of its setpoint in free
space; an integral term on settled errors (approach, descend) closes that gap, and a descent
counts as blocked only when the gripper touches something (`gripper_contact`).

Reads `Observation.privileged` as written by `rsd_ray.env.privileged.read_privileged_state`.
Goals handled: (On obj target) and (In obj region) with one movable object; others (Open,
TurnOn, and pushes) are not solved: the expert then holds still and reports it via
`unsupported_reason`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsd_ray.policy.base import ChunkStats, Observation, Policy, PolicyOutput, check_chunks
from rsd_ray.protocol import ACTION_DIM, CHUNK_STEPS

OPEN, CLOSE = -1.0, 1.0


@dataclass(frozen=True)
class ExpertConfig:
    # Arm model (measured, see module docstring).
    metres_per_action: float = 0.05      # OSC_POSE: action 1.0 = 0.05 m setpoint delta
    step_gain: float = 0.25              # fraction of the setpoint delta covered per step
    lag: float = 0.6                     # v' = lag * v + (1 - lag) * gain * delta
    pos_gain: float = 20.0               # action per metre of remaining error
    rot_gain: float = 2.0                # action per radian of orientation error
    rot_step_fraction: float = 0.12      # fraction of the commanded rotation covered per step
    max_action: float = 1.0
    descend_max_action: float = 0.5
    # Geometry.
    hover_m: float = 0.08                # approach height above the grasp point
    bowl_rim_offset_m: float = 0.047     # eef distance from the bowl centre for a rim grasp
    bowl_rim_depth_m: float = 0.015      # grasp this far below the rim
    raised_m: float = 0.1                # a bowl this far above the table top is "raised"
    inside_offset_m: float = 0.02        # bowl under an overhang: fingers in, this far to the open side
    inside_tip_m: float = 0.016          # ... fingertips this far above the bowl's bottom
    finger_tip_m: float = 0.013          # fingertips below the grasp point
    grasp_depth_m: float = 0.025         # other objects: this far below their top ...
    tall_object_m: float = 0.08          # ... objects taller than this (cartons, bottles) ...
    tall_grasp_depth_m: float = 0.03     # ... as deep as the hand's underside allows
    grasp_min_height_m: float = 0.01     # ... but at least this far above their bottom
    clearance_m: float = 0.05            # carried object's bottom above the target's top
    place_margin_m: float = 0.005        # release with the object this far above its surface
    drop_margin_m: float = 0.01          # for containers (In): release above the rim
    hand_bottom_m: float = 0.03          # the hand's underside above the grasp point
    slide_margin_m: float = 0.015        # keep the fingers this far inside the object's end
    # Tolerances and timings (steps).
    arrive_xy_m: float = 0.01
    arrive_z_m: float = 0.007
    # Expanding grasps (closed fingers into the bowl, then open) end the descent on a looser
    # arrival: any point with the fingertips well inside the bowl holds. Where the arm settles
    # short, the tight tolerance made the expert wait chunks for its integral term, a wait one
    # frame cannot show, so an imitator parked there pressing gently, forever (v5 on task 9: 0 of 50).
    # Measured on libero_spatial init states 0-49 (bench/results/expert_libero_spatial_expand_
    # tasks4_9_50trials_cpu.json): tasks 4 / 9 succeed 49/50 / 50/50 (tight: 50/50 / 49/50), in a
    # median 120 / 133 steps; on init states 0-19 the tight values took 138 / 133.
    expand_arrive_xy_m: float = 0.025
    expand_arrive_z_m: float = 0.02
    close_steps: int = 12
    open_steps: int = 8
    retreat_m: float = 0.10
    descend_cap_steps: int = 40
    held_tolerance_m: float = 0.03
    settled_m: float = 0.004             # eef moved less than this over a chunk: it has settled
    bias_gain: float = 1.0               # integral gain on a settled error, per chunk
    max_bias_m: float = 0.04


@dataclass
class _Prediction:
    """The expert's belief about the robot while it rolls a chunk forward."""
    pos: np.ndarray          # [3] eef position, m
    vel: np.ndarray          # [3] m per step
    rot_err: np.ndarray      # [3] axis-angle from current to desired orientation, world


@dataclass
class _Plan:
    """What the expert decided for one episode, from the poses it last read."""
    obj: str
    target: str
    relation: str            # "on" | "in"
    grasp: np.ndarray        # [3] eef position at grasp
    yaw: float               # rad about world z, from the start orientation, at grasp
    lift_z: float            # eef height while carrying
    place_xy: np.ndarray     # [2] where the object's body origin must end up
    place_bottom_z: float    # object bottom height at release
    obj_bottom_z: float      # object bottom when planned (at rest)
    hold: float = CLOSE      # gripper command that holds the object; -hold releases it


@dataclass
class _Episode:
    phase: str = "approach"
    phase_steps: int = 0
    plan: _Plan | None = None
    start_mat: np.ndarray | None = None       # [3, 3] eef orientation after the wait steps
    goal_mat: np.ndarray | None = None        # [3, 3] eef orientation to hold
    hold_offset: np.ndarray | None = None     # [3] object origin minus eef, while held
    hang_m: float = 0.0                       # eef height above the held object's bottom
    expected_z: float | None = None           # predicted eef z at this boundary
    start_z: float | None = None              # eef z at the previous boundary
    num_attempts: int = 0
    release: float = OPEN                     # gripper command while reopening after a retry
    bias: np.ndarray = field(default_factory=lambda: np.zeros(3))   # integral term on the setpoint
    last_eef: np.ndarray | None = None        # measured eef at the previous boundary
    log: list[str] = field(default_factory=list)


def _axis_angle(mat: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] -> axis-angle [3]."""
    cos = np.clip((np.trace(mat) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([mat[2, 1] - mat[1, 2], mat[0, 2] - mat[2, 0], mat[1, 0] - mat[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-9:   # angle ~ pi: any perpendicular axis of the symmetric part
        w, v = np.linalg.eigh((mat + mat.T) / 2.0)
        return v[:, np.argmax(w)] * angle
    return axis / norm * angle


class ScriptedExpert(Policy):
    """Solves LIBERO (On/In obj target) tasks from privileged poses, 8 steps per chunk."""

    name = "scripted_expert"
    decoding_mode = "none"
    acceptance = "none"
    lossless = True
    needs_privileged_state = True

    def __init__(self, config: ExpertConfig | None = None) -> None:
        self.config = config or ExpertConfig()
        self._episodes: dict[str, _Episode] = {}
        self.trace = False      # log the pose at every boundary into the episode's log

    # ---- Policy API ----------------------------------------------------------------------
    def predict(self, observations: list[Observation]) -> PolicyOutput:
        chunks = np.stack([self._chunk(obs) for obs in observations])   # [B, T, A]
        return PolicyOutput(chunks=check_chunks(chunks, len(observations)),
                            stats=[ChunkStats(batch_size=len(observations)) for _ in observations])

    def begin_episode(self, episode_key: str, eef_mat: np.ndarray) -> None:
        """Start an episode's memory: `eef_mat` [3, 3] is the orientation to hold. A policy that
        hands an episode over mid-way (takeover.py) calls this at chunk 0 with the start pose."""
        start = np.asarray(eef_mat, dtype=np.float64).copy()
        self._episodes[episode_key] = _Episode(start_mat=start, goal_mat=start.copy())

    def end_episode(self, episode_key: str) -> None:
        self._episodes.pop(episode_key, None)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["config"] = {k: v for k, v in self.config.__dict__.items()}
        return out

    def episode_log(self, episode_key: str) -> list[str]:
        """Phase changes, retries and (with `trace`) boundary poses of an episode."""
        ep = self._episodes.get(episode_key)
        return list(ep.log) if ep else []

    def phase_of(self, episode_key: str) -> str:
        """The phase an episode is in (for logs and tests)."""
        ep = self._episodes.get(episode_key)
        return ep.phase if ep else "none"

    @staticmethod
    def unsupported_reason(goal: list[list[str]]) -> str:
        """Why this expert cannot solve a goal, or '' when it can."""
        if len(goal) != 1:
            return f"goal has {len(goal)} predicates; the expert handles exactly one"
        if goal[0][0] not in ("on", "in") or len(goal[0]) != 3:
            return f"predicate {goal[0][0]!r} is not a pick-and-place (on/in)"
        return ""

    # ---- one chunk -----------------------------------------------------------------------
    def _chunk(self, obs: Observation) -> np.ndarray:
        state = obs.privileged
        if state is None:
            raise ValueError(f"ScriptedExpert needs Observation.privileged for {obs.episode_key!r}; "
                             "got None (does the env side honour needs_privileged_state?)")
        if obs.chunk_index == 0 or obs.episode_key not in self._episodes:
            self.begin_episode(obs.episode_key, state["eef_mat"])
        ep = self._episodes[obs.episode_key]
        chunk = np.zeros((CHUNK_STEPS, ACTION_DIM), dtype=np.float64)   # [T, A]
        if self.unsupported_reason(state["goal"]):
            chunk[:, 6] = OPEN
            return chunk
        self._boundary_checks(ep, state)
        if self.trace:
            obj = state["objects"][ep.plan.obj] if ep.plan else None
            ep.log.append(f"[{obs.chunk_index} {ep.phase} eef {np.round(state['eef_pos'], 3).tolist()} "
                          f"exp_z {ep.expected_z and round(ep.expected_z, 3)} "
                          f"obj {np.round(obj['pos'], 3).tolist() if obj else '-'} "
                          f"grasp {np.round(ep.plan.grasp, 3).tolist() if ep.plan else '-'}]")
        pred = _Prediction(
            pos=np.asarray(state["eef_pos"], dtype=np.float64).copy(),
            vel=np.asarray(state.get("eef_vel", np.zeros(3)), dtype=np.float64) * 0.05,
            rot_err=_axis_angle(ep.goal_mat @ np.asarray(state["eef_mat"]).T),
        )
        for step in range(CHUNK_STEPS):
            target, gripper = self._phase_target(ep, state, pred)
            # Descend slowly: at full speed the arm swings out ~1.5 cm past the grasp point
            # in x and the hand meets the neighbours before it corrects.
            near = ep.plan is not None and pred.pos[2] - ep.plan.grasp[2] < 0.05
            limit = self.config.descend_max_action if ep.phase == "descend" and near else None
            chunk[step] = self._action(pred, target, gripper, limit)
            ep.phase_steps += 1
        ep.expected_z = float(pred.pos[2])
        ep.start_z = float(state["eef_pos"][2])
        return chunk

    def _action(self, pred: _Prediction, target: np.ndarray, gripper: float,
                max_action: float | None = None) -> np.ndarray:
        """One step's action toward `target` from the predicted pose; advances the prediction."""
        cfg = self.config
        limit = cfg.max_action if max_action is None else max_action
        u_pos = np.clip(cfg.pos_gain * (target - pred.pos), -limit, limit)
        u_rot = np.clip(cfg.rot_gain * pred.rot_err, -cfg.max_action, cfg.max_action)
        pred.vel = cfg.lag * pred.vel + (1 - cfg.lag) * cfg.step_gain * cfg.metres_per_action * u_pos
        pred.pos = pred.pos + pred.vel
        pred.rot_err = pred.rot_err - cfg.rot_step_fraction * 0.5 * u_rot
        return np.concatenate([u_pos, u_rot, [gripper]])

    # ---- planning from poses -------------------------------------------------------------
    def _make_plan(self, state: dict[str, Any]) -> _Plan:
        cfg = self.config
        relation, obj_name, target_name = state["goal"][0]
        objects = state["objects"]
        obj = objects[obj_name]
        lo, hi = np.asarray(obj["aabb_min"]), np.asarray(obj["aabb_max"])
        centre = (lo + hi) / 2.0
        eef = np.asarray(state["eef_pos"])
        yaw = 0.0
        hold = CLOSE
        others = [(np.asarray(o["aabb_min"]), np.asarray(o["aabb_max"]))
                  for name, o in objects.items() if name != obj_name and o["kind"] == "object"]
        away = _away_from_overhang(state.get("fixture_boxes"), lo, hi) if "bowl" in obj_name else None
        raised = float(lo[2]) - float(state.get("table_top_z", lo[2])) > cfg.raised_m
        if "bowl" in obj_name and (away is not None or raised):
            # An expanding grasp: lower the closed fingers into the bowl and open them against
            # its inner wall. It needs no room outside the rim (a bowl in a drawer under the
            # cabinet top has none), and on a raised bowl (on the cabinet) it holds where a rim
            # pinch slips, because there the arm settles a centimetre high and pinches only
            # the lip. On a table-height bowl the rim pinch is the surer one: near the robot's
            # base the fingers slide up the bowl's flared wall as the arm lifts. The hand
            # spreads along the closing axis, so pick the axis that keeps it off the
            # neighbours; under an overhang, across the direction away from it, shifted to
            # the open side of the panel's edge.
            grasp = np.array([centre[0], centre[1], lo[2] + cfg.inside_tip_m + cfg.finger_tip_m])
            if away is not None:
                grasp[:2] += cfg.inside_offset_m * away
                yaw = float(np.arctan2(away[1], away[0]))
                yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2      # closing axis is symmetric
            else:
                volumes = [_hand_overlap(grasp, others, cfg.hand_bottom_m, with_fingers=False, quarter_turn=turn)
                           for turn in (False, True)]
                yaw = np.pi / 2 if volumes[1] < volumes[0] - 1e-9 else 0.0
            hold = OPEN
        elif "bowl" in obj_name:
            # Pinch the rim wall at +y or -y (fingers close along y): on the side where the
            # hand overlaps the neighbours least, else the side nearer the gripper.
            sides = sorted((1.0, -1.0), key=lambda side: side != (1.0 if eef[1] >= centre[1] else -1.0))
            candidates = [np.array([centre[0], centre[1] + side * cfg.bowl_rim_offset_m,
                                    hi[2] - cfg.bowl_rim_depth_m]) for side in sides]
            volumes = [_hand_overlap(point, others, cfg.hand_bottom_m) for point in candidates]
            grasp = candidates[int(np.argmin(volumes))] if volumes[1] < volumes[0] - 1e-9 else candidates[0]
        else:
            depth = cfg.tall_grasp_depth_m if hi[2] - lo[2] > cfg.tall_object_m else cfg.grasp_depth_m
            grasp = np.array([centre[0], centre[1],
                              max(hi[2] - depth, lo[2] + cfg.grasp_min_height_m)])
            grasp = self._clear_neighbours(grasp, obj_name, objects)

        target = objects[target_name]
        t_lo, t_hi = np.asarray(target["aabb_min"]), np.asarray(target["aabb_max"])
        place_xy = np.asarray(target["pos"], dtype=np.float64)[:2].copy()
        if target["kind"] == "site":
            surface = float(target.get("surface_z", t_hi[2]))
            parent = objects.get(target.get("parent", ""))
            if relation == "in" and parent is not None and parent["kind"] == "object":
                # A container (basket): drop the object in from just above the rim; a tall
                # one (a carton) is set down on the floor instead, because it can stay jammed
                # in the open fingers and would leave again with them.
                surface = float(parent["aabb_max"][2])
                place_bottom = surface + cfg.drop_margin_m
                if hi[2] - lo[2] > cfg.tall_object_m:
                    place_bottom = float(parent["aabb_min"][2]) + cfg.drop_margin_m
            else:
                place_bottom = surface + cfg.place_margin_m
        elif "bowl" in target_name:
            # Into the bowl: its floor, not its rim.
            place_bottom = float(t_lo[2]) + 0.02
            surface = float(t_hi[2])
        else:
            surface = float(t_hi[2])
            place_bottom = surface + cfg.place_margin_m

        hang = grasp[2] - lo[2]             # eef above the object's bottom once grasped
        # Clear the target and anything between the grasp and the place point.
        top = surface
        path_a, path_b = grasp[:2], place_xy
        for name, other in objects.items():
            if name == obj_name or other["kind"] == "site":
                continue
            o_lo, o_hi = np.asarray(other["aabb_min"]), np.asarray(other["aabb_max"])
            if _segment_hits_box(path_a, path_b, o_lo[:2] - 0.03, o_hi[:2] + 0.03):
                top = max(top, float(o_hi[2]))
        lift_z = max(grasp[2] + cfg.hover_m, top + hang + cfg.clearance_m)
        return _Plan(obj=obj_name, target=target_name, relation=relation, grasp=grasp, yaw=yaw,
                     lift_z=float(lift_z), place_xy=place_xy, place_bottom_z=float(place_bottom),
                     obj_bottom_z=float(lo[2]), hold=hold)

    def _clear_neighbours(self, grasp: np.ndarray, obj_name: str, objects: dict[str, Any]) -> np.ndarray:
        """Slide the grasp point along the object's long horizontal axis until the hand (wide
        along y, the closing direction) stays clear of the neighbouring objects' boxes.

        The hand is ~20 cm across the fingers' closing axis and sits ~3 cm above the grasp
        point, so on a crowded table it lands on a neighbour's top and the fingers stop short
        of a flat object (seen on libero_object's cream cheese next to the tomato sauce).
        """
        cfg = self.config
        obj = objects[obj_name]
        if "local_min" not in obj:
            return grasp
        w, x, y, z = np.asarray(obj["quat_wxyz"], dtype=np.float64)
        rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        half = (np.asarray(obj["local_max"]) - np.asarray(obj["local_min"])) / 2.0
        # Body axes that lie flat in the world; the longest of them is the one to slide along.
        flat = [i for i in range(3) if abs(rot[2, i]) < 0.5]
        if not flat:
            return grasp
        axis_i = max(flat, key=lambda i: half[i])
        axis = rot[:2, axis_i] / max(np.linalg.norm(rot[:2, axis_i]), 1e-9)
        reach = max(half[axis_i] - cfg.slide_margin_m, 0.0)
        others = [(np.asarray(o["aabb_min"]), np.asarray(o["aabb_max"]))
                  for name, o in objects.items() if name != obj_name and o["kind"] == "object"]

        def overlap(point: np.ndarray) -> float:
            return _hand_overlap(point, others, cfg.hand_bottom_m, with_fingers=False)

        best, best_overlap = grasp, overlap(grasp)
        for shift in np.arange(0.005, reach + 1e-9, 0.005):
            if best_overlap == 0.0:
                break
            for sign in (1.0, -1.0):
                point = grasp.copy()
                point[:2] += sign * shift * axis
                volume = overlap(point)
                if volume < best_overlap - 1e-9:
                    best, best_overlap = point, volume
        return best

    # ---- feedback at a chunk boundary ----------------------------------------------------
    def _set_phase(self, ep: _Episode, phase: str) -> None:
        ep.log.append(f"{ep.phase}->{phase}@{ep.phase_steps}")
        ep.phase, ep.phase_steps = phase, 0
        if phase in ("approach", "grasp"):
            ep.bias = np.zeros(3)

    def _integrate(self, ep: _Episode, err: np.ndarray, settled: bool) -> None:
        """Integral action: where the arm reaching far or high settles a few cm short of its
        setpoint in free space (the OSC's delta setpoints leave a steady error against the
        unmodelled joint friction and nullspace pull), shift the setpoint by the error left."""
        if settled:
            ep.bias = np.clip(ep.bias + self.config.bias_gain * err, -self.config.max_bias_m, self.config.max_bias_m)

    def _boundary_checks(self, ep: _Episode, state: dict[str, Any]) -> None:
        cfg = self.config
        if ep.plan is None or (ep.phase == "approach" and ep.phase_steps == 0):
            ep.plan = self._make_plan(state)
        plan = ep.plan
        cos, sin = np.cos(plan.yaw), np.sin(plan.yaw)
        ep.goal_mat = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) @ ep.start_mat
        obj = state["objects"][plan.obj]
        eef = np.asarray(state["eef_pos"])
        obj_pos = np.asarray(obj["pos"])
        stalled = (ep.expected_z is not None and ep.start_z is not None
                   and (ep.start_z - eef[2]) < 0.3 * (ep.start_z - ep.expected_z)
                   and (ep.start_z - ep.expected_z) > 0.01)
        settled = ep.last_eef is not None and float(np.linalg.norm(eef - ep.last_eef)) < cfg.settled_m
        ep.last_eef = eef.copy()
        if ep.phase == "approach" and ep.phase_steps > 0:
            err = plan.grasp + np.array([0.0, 0.0, cfg.hover_m]) - eef
            rot_err = np.linalg.norm(_axis_angle(ep.goal_mat @ np.asarray(state["eef_mat"]).T))
            if np.linalg.norm(err[:2]) < cfg.arrive_xy_m and (rot_err < 0.1 or settled):
                # A wrist that stops short of the yaw (far reach) is close enough once settled.
                if rot_err >= 0.1:
                    ep.log.append(f"approach: yaw settled {rot_err:.2f} rad short")
                self._set_phase(ep, "descend")
            else:
                self._integrate(ep, np.array([err[0], err[1], 0.0]), settled)
        if ep.phase == "descend":
            err = plan.grasp - eef
            touching = bool(state.get("gripper_contact", True))
            expanding = plan.hold == OPEN
            arrive_xy = cfg.expand_arrive_xy_m if expanding else cfg.arrive_xy_m
            arrive_z = cfg.expand_arrive_z_m if expanding else cfg.arrive_z_m
            if np.linalg.norm(err[:2]) < arrive_xy and abs(err[2]) < arrive_z:
                self._set_phase(ep, "grasp")
            elif (stalled and touching) or ep.phase_steps >= cfg.descend_cap_steps:
                # Something (a wall, a drawer edge) stops the fingers: grasp from here.
                ep.log.append(f"descend stalled {np.round(err, 3).tolist()}")
                self._set_phase(ep, "grasp")
            else:
                self._integrate(ep, err, settled or stalled)
        elif ep.phase == "lift":
            lifted = float(eef[2] - plan.grasp[2])
            rise_expected = (ep.expected_z - ep.start_z) if ep.expected_z is not None and ep.start_z is not None else 0.0
            if rise_expected > 0.02 and (eef[2] - ep.start_z) < 0.2 * rise_expected:
                # Held down by something above (a cabinet panel over a drawer).
                self._retry(ep, f"lift blocked at z {eef[2]:.3f}")
                return
            if lifted > 0.03:
                if float(obj["aabb_min"][2]) < plan.obj_bottom_z + 0.5 * lifted:
                    self._retry(ep, f"grasp did not hold on lift (eef +{lifted:.3f}, object "
                                    f"+{float(obj['aabb_min'][2]) - plan.obj_bottom_z:.3f}, "
                                    f"fingers {np.round(state['gripper_qpos'], 4).tolist()})")
                    return
        elif ep.phase in ("carry", "place") and ep.hold_offset is not None:
            if np.linalg.norm(obj_pos - eef - ep.hold_offset) > cfg.held_tolerance_m:
                self._retry(ep, f"object slipped during {ep.phase}")
                return
        if ep.phase == "place" and stalled:
            self._set_phase(ep, "release")
        if ep.phase in ("lift", "carry"):
            # Re-measure how the object hangs below the gripper while it is held.
            if ep.phase == "carry" or eef[2] - plan.grasp[2] > 0.03:
                ep.hold_offset = obj_pos - eef
                ep.hang_m = float(eef[2] - obj["aabb_min"][2])
        if ep.phase == "done":
            # Released but the env has not ended the episode: try again from fresh poses.
            self._retry(ep, "released without success")

    def _retry(self, ep: _Episode, why: str) -> None:
        ep.log.append(f"retry: {why}")
        ep.num_attempts += 1
        ep.release = -ep.plan.hold if ep.plan is not None else OPEN
        ep.hold_offset = None
        ep.plan = None
        self._set_phase(ep, "reopen")

    # ---- per-step targets ----------------------------------------------------------------
    def _phase_target(self, ep: _Episode, state: dict[str, Any], pred: _Prediction) -> tuple[np.ndarray, float]:
        cfg = self.config
        plan = ep.plan
        if ep.phase == "reopen":
            # Open and back off upward before planning again.
            if ep.phase_steps >= cfg.open_steps:
                self._set_phase(ep, "approach")
                plan = ep.plan = self._make_plan(state) if ep.plan is None else ep.plan
            else:
                return pred.pos + np.array([0.0, 0.0, 0.01]), ep.release
        if plan is None:
            plan = ep.plan = self._make_plan(state)
        if ep.phase == "approach":
            above = plan.grasp + np.array([0.0, 0.0, cfg.hover_m]) + ep.bias
            above[2] = max(above[2], min(pred.pos[2], plan.lift_z))
            # Ends at a boundary on the measured pose (see _boundary_checks).
            return above, -plan.hold
        if ep.phase == "descend":
            # Ends at a boundary, on the measured pose (see _boundary_checks): the arm settles
            # a few mm short of a setpoint under gravity, which the model does not capture.
            return plan.grasp + ep.bias, -plan.hold
        if ep.phase == "grasp":
            if ep.phase_steps >= cfg.close_steps:
                self._set_phase(ep, "lift")
            else:
                return plan.grasp.copy(), plan.hold
        if ep.phase == "lift":
            target = np.array([pred.pos[0], pred.pos[1], plan.lift_z])
            if abs(plan.lift_z - pred.pos[2]) < 0.02:
                self._set_phase(ep, "carry")
            else:
                return target, plan.hold
        offset = ep.hold_offset if ep.hold_offset is not None else np.zeros(3)
        if ep.phase == "carry":
            target = np.array([plan.place_xy[0] - offset[0], plan.place_xy[1] - offset[1], plan.lift_z])
            if np.linalg.norm(target[:2] - pred.pos[:2]) < cfg.arrive_xy_m:
                self._set_phase(ep, "place")
            else:
                return target, plan.hold
        if ep.phase == "place":
            z = plan.place_bottom_z + ep.hang_m
            target = np.array([plan.place_xy[0] - offset[0], plan.place_xy[1] - offset[1], z])
            if abs(z - pred.pos[2]) < 0.005:
                self._set_phase(ep, "release")
            else:
                return target, plan.hold
        if ep.phase == "release":
            if ep.phase_steps >= cfg.open_steps:
                self._set_phase(ep, "retreat")
            else:
                return pred.pos.copy(), -plan.hold
        if ep.phase == "retreat":
            if ep.phase_steps >= 16:
                self._set_phase(ep, "done")
            else:
                return pred.pos + np.array([0.0, 0.0, 0.02]), -plan.hold
        return pred.pos.copy(), -plan.hold   # done: hold still until the boundary retries


# The gripper in its start orientation (fingers closing along world y), as boxes relative to
# the grasp point: the hand above, and the two open fingers (measured from the Panda's geoms).
_FINGER_BOXES = (((-0.013, 0.032, -0.013), (0.013, 0.068, 0.049)),
                 ((-0.013, -0.068, -0.013), (0.013, -0.032, 0.049)))


def _hand_overlap(point: np.ndarray, others: list[tuple[np.ndarray, np.ndarray]], hand_bottom_m: float,
                  with_fingers: bool = True, quarter_turn: bool = False) -> float:
    """Volume (m^3) of the gripper's boxes inside the neighbours' boxes at grasp `point` [3],
    with the hand in its start orientation or turned a quarter about z."""
    boxes = [(np.array([-0.03, -0.105, hand_bottom_m]), np.array([0.04, 0.105, 0.15]))]
    if with_fingers:
        boxes += [(np.array(lo), np.array(hi)) for lo, hi in _FINGER_BOXES]
    if quarter_turn:
        # A quarter turn about z maps the box (x, y) extents onto (-y, x).
        boxes = [(np.array([-b_hi[1], b_lo[0], b_lo[2]]), np.array([-b_lo[1], b_hi[0], b_hi[2]]))
                 for b_lo, b_hi in boxes]
    total = 0.0
    for b_lo, b_hi in boxes:
        lo, hi = point + b_lo, point + b_hi
        for o_lo, o_hi in others:
            total += float(np.prod(np.clip(np.minimum(hi, o_hi) - np.maximum(lo, o_lo), 0.0, None)))
    return total


def _away_from_overhang(boxes: np.ndarray | None, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Unit xy direction [2] from fixture parts overhanging an object (AABB lo, hi [3]) just
    above its top, toward the open side; None when nothing overhangs it."""
    if boxes is None or len(boxes) == 0:
        return None
    boxes = np.asarray(boxes)
    b_lo, b_hi = boxes[:, :3], boxes[:, 3:]
    over = ((b_lo[:, 2] > hi[2] - 0.01) & (b_lo[:, 2] < hi[2] + 0.06)
            & np.all(b_lo[:, :2] < hi[None, :2], axis=1) & np.all(b_hi[:, :2] > lo[None, :2], axis=1))
    if not over.any():
        return None
    centre = (lo[:2] + hi[:2]) / 2.0
    # Weight each overhanging part by how much of the object's footprint it covers.
    covered = (np.clip(np.minimum(b_hi[over, :2], hi[:2]) - np.maximum(b_lo[over, :2], lo[:2]), 0, None))
    area = covered[:, 0] * covered[:, 1]
    part_centre = (np.maximum(b_lo[over, :2], lo[:2]) + np.minimum(b_hi[over, :2], hi[:2])) / 2.0
    pull = (area[:, None] * (centre - part_centre)).sum(axis=0)
    norm = np.linalg.norm(pull)
    return pull / norm if norm > 1e-9 else None


def _segment_hits_box(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether the 2-D segment a->b passes through the box [lo, hi] (all [2])."""
    for t in np.linspace(0.0, 1.0, 21):
        p = a + t * (b - a)
        if np.all(p >= lo) and np.all(p <= hi):
            return True
    return False
