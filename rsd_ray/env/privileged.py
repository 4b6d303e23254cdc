"""Simulator state for privileged policies (the scripted expert), read at a chunk boundary.

`read_privileged_state(env)` returns plain picklable data (numpy arrays, floats, strings,
lists, dicts) so it can cross a Ray boundary inside `Observation.privileged`. Keys:

- `eef_pos` [3] world m, `eef_quat_xyzw` [4] and `eef_mat` [3, 3] of the grip site the
  OSC controller drives, `eef_vel` [3] m/s, `gripper_qpos` [2] (finger joints, +/-0.04 open)
- `goal`: the BDDL goal predicates, e.g. [["on", "akita_black_bowl_1", "plate_1"]]
- `table_top_z`: world z of the table surface
- `gripper_contact`: whether the gripper touches anything but the robot
- `fixture_boxes` [N, 6]: world AABB (min xyz, max xyz) of every collision geom of every
  fixture (cabinet panels, drawer walls, stove parts)
- `objects`: name -> dict for every movable object, every fixture, and every region named in
  the goal (with its parent fixture):
    `kind` "object" | "fixture" | "site"; `pos` [3] world; `quat_wxyz` [4];
    `aabb_min`, `aabb_max` [3] world axis-aligned box of the collision geoms of the body and
    its children (for a site: the box LIBERO's own `in_box` test uses);
    `local_min`, `local_max` [3] the same geoms boxed in the body's own frame (bodies only);
    `joint_qpos` list[float] (articulated fixtures: drawers, knobs; sites: the joints they own)
    `site_size` [3], `site_mat` [3, 3], `parent` and `surface_z` (the height an object set
    down in the region rests on) for sites only.

No torch here: this runs inside the env actor.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _inner_env(env: Any) -> Any:
    """OffScreenRenderEnv wraps the robosuite problem env in `.env`; accept either."""
    return env.env if hasattr(env, "env") and hasattr(env.env, "sim") else env


def _subtree_bodies(body_parentid: np.ndarray, root: int) -> np.ndarray:
    """Ids of `root` and all its descendants (body_parentid: [num_bodies])."""
    in_tree = np.zeros(len(body_parentid), dtype=bool)
    in_tree[root] = True
    # Parents always have smaller ids than their children in a MuJoCo model, so one pass suffices.
    for body in range(root + 1, len(body_parentid)):
        if in_tree[body_parentid[body]]:
            in_tree[body] = True
    return np.flatnonzero(in_tree)


def _geom_boxes(sim: Any, root_body: int, frame: np.ndarray | None = None,
                origin: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AABBs (min [G, 3], max [G, 3]) of each collision geom under `root_body`, in the world
    frame or, given `frame` [3, 3] (columns = axes in world) and `origin` [3], in that frame."""
    model, data = sim.model, sim.data
    bodies = _subtree_bodies(np.asarray(model.body_parentid), root_body)
    geom_body = np.asarray(model.geom_bodyid)
    collides = (np.asarray(model.geom_contype) != 0) | (np.asarray(model.geom_conaffinity) != 0)
    geoms = np.flatnonzero(np.isin(geom_body, bodies) & collides)
    if len(geoms) == 0:   # purely visual body: fall back to every geom it has
        geoms = np.flatnonzero(np.isin(geom_body, bodies))
    if len(geoms) == 0:
        pos = np.asarray(data.body_xpos[root_body], dtype=np.float64)[None]
        return pos.copy(), pos.copy()
    aabb = np.asarray(model.geom_aabb)[geoms]                 # [G, 6] local centre, half-size
    centre, half = aabb[:, :3], aabb[:, 3:]
    xmat = np.asarray(data.geom_xmat)[geoms].reshape(-1, 3, 3)
    xpos = np.asarray(data.geom_xpos)[geoms]
    if frame is not None:
        xmat = np.einsum("ji,gjk->gik", frame, xmat)           # frame^T @ xmat
        xpos = (xpos - origin) @ frame
    world_centre = xpos + np.einsum("gij,gj->gi", xmat, centre)
    world_half = np.einsum("gij,gj->gi", np.abs(xmat), half)  # box of the rotated box
    return world_centre - world_half, world_centre + world_half


def _collision_aabb(sim: Any, root_body: int) -> tuple[np.ndarray, np.ndarray]:
    """World AABB (min [3], max [3]) of the collision geoms under `root_body`."""
    lo, hi = _geom_boxes(sim, root_body)
    return lo.min(axis=0), hi.max(axis=0)


def _joint_qpos(sim: Any, joints: Any) -> list[float]:
    values = []
    for joint in joints or []:
        try:
            addr = sim.model.get_joint_qpos_addr(joint)
        except (ValueError, KeyError):
            continue
        values.append(float(sim.data.qpos[addr if np.isscalar(addr) else addr[0]]))
    return values


def _body_entry(problem: Any, name: str, kind: str) -> dict[str, Any]:
    sim = problem.sim
    body = problem.obj_body_id[name]
    lo, hi = _collision_aabb(sim, body)
    # The same box in the body's own frame: its extents along the body axes tell a gripper
    # which way a (possibly rotated) box is narrow.
    frame = np.array(sim.data.body_xmat[body], dtype=np.float64).reshape(3, 3)
    local_lo, local_hi = _geom_boxes(sim, body, frame=frame, origin=np.asarray(sim.data.body_xpos[body]))
    obj = problem.get_object(name)
    return {
        "kind": kind,
        "pos": np.array(sim.data.body_xpos[body], dtype=np.float64),
        "quat_wxyz": np.array(sim.data.body_xquat[body], dtype=np.float64),
        "aabb_min": lo, "aabb_max": hi,
        "local_min": local_lo.min(axis=0), "local_max": local_hi.max(axis=0),
        # Movable objects hang on a free joint, whose first qpos is meaningless alone.
        "joint_qpos": [] if kind == "object" else _joint_qpos(sim, getattr(obj, "joints", None)),
    }


def _site_entry(problem: Any, name: str) -> dict[str, Any]:
    sim = problem.sim
    site = problem.object_sites_dict[name]
    pos = np.array(sim.data.get_site_xpos(name), dtype=np.float64)
    mat = np.array(sim.data.get_site_xmat(name), dtype=np.float64).reshape(3, 3)
    size = np.asarray(site.size if site.size is not None else np.zeros(3), dtype=np.float64)
    half = np.abs(mat @ size)   # the same box LIBERO's SiteObject.in_box tests against
    w, x, y, z = _mat_to_quat_wxyz(mat)
    # The height an object resting in this region would stand on: the highest collision geom
    # of the parent fixture whose footprint overlaps the region (a burner, a shelf), else the
    # region's own top.
    surface_z = float(pos[2] + half[2])
    parent = site.parent_name or ""
    if parent in problem.obj_body_id:
        lo, hi = _geom_boxes(sim, problem.obj_body_id[parent])
        overlap = np.all((lo[:, :2] < (pos + half)[None, :2]) & (hi[:, :2] > (pos - half)[None, :2]), axis=1)
        below = overlap & (hi[:, 2] < pos[2] + half[2] + 0.08)
        if below.any():
            surface_z = float(hi[below, 2].max())
    return {
        "kind": "site",
        "pos": pos, "quat_wxyz": np.array([w, x, y, z]),
        "aabb_min": pos - half, "aabb_max": pos + half,
        "joint_qpos": _joint_qpos(sim, site.joints),
        "site_size": size, "site_mat": mat,
        "parent": parent, "surface_z": surface_z,
    }


def _mat_to_quat_wxyz(mat: np.ndarray) -> tuple[float, float, float, float]:
    trace = float(np.trace(mat))
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        return (0.25 * s, (mat[2, 1] - mat[1, 2]) / s, (mat[0, 2] - mat[2, 0]) / s, (mat[1, 0] - mat[0, 1]) / s)
    i = int(np.argmax(np.diag(mat)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = 2.0 * np.sqrt(1.0 + mat[i, i] - mat[j, j] - mat[k, k])
    q = [0.0, 0.0, 0.0, 0.0]
    q[0] = (mat[k, j] - mat[j, k]) / s
    q[1 + i] = 0.25 * s
    q[1 + j] = (mat[j, i] + mat[i, j]) / s
    q[1 + k] = (mat[k, i] + mat[i, k]) / s
    return tuple(float(v) for v in q)


def read_privileged_state(env: Any) -> dict[str, Any]:
    """Robot, goal and object state of a LIBERO env (OffScreenRenderEnv or its inner env)."""
    problem = _inner_env(env)
    sim = problem.sim
    robot = problem.robots[0]
    eef_site = robot.eef_site_id
    eef_pos = np.array(sim.data.site_xpos[eef_site], dtype=np.float64)
    w, x, y, z = _mat_to_quat_wxyz(np.array(sim.data.site_xmat[eef_site]).reshape(3, 3))
    eef_vel = np.array(sim.data.get_site_xvelp(robot.controller.eef_name), dtype=np.float64) \
        if hasattr(robot, "controller") else np.zeros(3)
    gripper_qpos = np.array([sim.data.qpos[i] for i in robot._ref_gripper_joint_pos_indexes],
                            dtype=np.float64)

    goal = [[str(term) for term in predicate] for predicate in problem.parsed_problem["goal_state"]]
    objects: dict[str, dict[str, Any]] = {}
    for name in problem.objects_dict:
        objects[name] = _body_entry(problem, name, "object")
    for name in problem.fixtures_dict:
        if name in problem.obj_body_id:
            objects[name] = _body_entry(problem, name, "fixture")
    for predicate in goal:
        for name in predicate[1:]:
            if name in problem.object_sites_dict and name not in objects:
                objects[name] = _site_entry(problem, name)

    # Every collision geom of every fixture as a world box: lets the expert see overhangs
    # (a cabinet's top panel above a drawer) that the fixture's single box hides.
    boxes = [np.concatenate(_geom_boxes(sim, problem.obj_body_id[name]), axis=1)
             for name in problem.fixtures_dict if name in problem.obj_body_id]
    fixture_boxes = np.concatenate(boxes, axis=0) if boxes else np.zeros((0, 6))
    table_top_z = float(problem.workspace_offset[2]) if hasattr(problem, "workspace_offset") else 0.9
    return {
        "eef_pos": eef_pos,
        "eef_quat_xyzw": np.array([x, y, z, w]),   # the OSC-controlled grip site's frame
        "eef_mat": np.array(sim.data.site_xmat[eef_site], dtype=np.float64).reshape(3, 3),
        "eef_vel": eef_vel,                        # [3] m/s, world frame
        "gripper_qpos": gripper_qpos,
        "goal": goal,
        "table_top_z": table_top_z,
        "objects": objects,
        "fixture_boxes": fixture_boxes,           # [N, 6] world min xyz, max xyz
        "gripper_contact": _gripper_touches_world(sim, robot),
    }


def _gripper_touches_world(sim: Any, robot: Any) -> bool:
    """Whether any gripper geom touches something that is not the robot: tells a hand blocked
    by a wall from an arm that merely settles short of its setpoint."""
    model = sim.model

    def body_ids(names: Any) -> set[int]:
        return {model.body_name2id(name) for name in names if name in model._body_name2id}

    gripper = body_ids(robot.gripper.bodies)
    robot_bodies = gripper | body_ids(robot.robot_model.bodies)
    for i in range(sim.data.ncon):
        contact = sim.data.contact[i]
        b1, b2 = model.geom_bodyid[contact.geom1], model.geom_bodyid[contact.geom2]
        if (b1 in gripper and b2 not in robot_bodies) or (b2 in gripper and b1 not in robot_bodies):
            return True
    return False


def _goal_pair(state: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(object, target) entries of a 3-term first goal predicate such as ('on', object, target)."""
    goal = state.get("goal") or []
    if not goal or len(goal[0]) != 3:
        return None, None
    return state["objects"].get(goal[0][1]), state["objects"].get(goal[0][2])


def goal_object(state: dict[str, Any]) -> dict[str, Any] | None:
    """The object an ('on', object, target) goal moves; None for other goals."""
    return _goal_pair(state)[0]


def _box_centre(entry: dict[str, Any]) -> np.ndarray:
    return (np.asarray(entry["aabb_min"], dtype=np.float64) + np.asarray(entry["aabb_max"], dtype=np.float64)) / 2.0


def goal_offsets(state: dict[str, Any]) -> list[float] | None:
    """[goal object - grip site, target - grip site], world metres, box centres: 6 floats
    (SAMPLE_SCHEMA `goal_offsets`, an auxiliary training label for localisation). None unless
    the first goal predicate is (relation, object, target) with both in `objects`."""
    obj, target = _goal_pair(state)
    if obj is None or target is None:
        return None
    eef = np.asarray(state["eef_pos"], dtype=np.float64)
    return np.concatenate([_box_centre(obj) - eef, _box_centre(target) - eef]).astype(np.float32).tolist()
