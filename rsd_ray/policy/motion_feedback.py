"""Motion feedback: what the previous chunk commanded and what the arm actually did.

A single observation cannot tell a policy that the arm is *stuck*. Where the arm reaches far or
high (a bowl on the cabinet, in a drawer), the OSC controller settles centimetres short of small
setpoint deltas; the scripted expert closes that gap with an integral term over chunks, so the
same image is labelled with a gentle push the first time and a hard one after a stall. A policy
that sees only the image averages the two and re-issues the gentle chunk forever (libero_spatial
task 9: the closed fingers hover 2 cm above the bowl until the episode times out). Feeding back
the previous chunk's commanded translation beside the displacement it achieved makes a stall
visible: commanded down, moved nowhere.

Six numbers per chunk boundary, zeros where there is no previous chunk of the same episode
(its first chunk, or a takeover sample whose previous chunk was the learner's and not recorded):
  [0:3] mean x/y/z action of the previous chunk (action units, [-1, 1]),
  [3:6] eef displacement since the previous boundary, in decimetres (x10 m: ~[-1, 1] per chunk).
Training (`training.build_demo_tensors`) and evaluation (`RSDPolicy`) both compute them here.

Measured so far (libero_spatial init states 30-39, v5 fine-tuned 36 min on the same 368
demonstrations with and without it): 42/100 vs 41/100, task 9 still 0/10; no measurable gain at
that budget (`bench/results/default_policy_v6_vs_v6f_trials30-39_cpu/`). Off by default for new
models; the shipped default (v20) has it, grown onto v18 together with two other changes, and
gains on task 4 (44 to 78 % over 50 trials) but not on task 9 (46 to 40 %), so it does not yet cure
the stall above on its own (docs/DEFAULT_POLICY.md).
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

from rsd_ray.protocol import ACTION_DIM

MOTION_FEEDBACK_DIM = 6
DISPLACEMENT_SCALE = 10.0       # metres -> decimetres


def motion_feedback(previous_chunk: np.ndarray | None, previous_eef: np.ndarray | None,
                    eef: np.ndarray) -> np.ndarray:
    """previous_chunk [T, A] or [T*A] actions (None: no previous chunk); previous_eef, eef [3]
    metres. Returns [6] float32."""
    if previous_chunk is None or previous_eef is None:
        return np.zeros(MOTION_FEEDBACK_DIM, np.float32)
    actions = np.asarray(previous_chunk, np.float64).reshape(-1, ACTION_DIM)
    commanded = actions[:, :3].mean(axis=0)
    moved = (np.asarray(eef, np.float64)[:3] - np.asarray(previous_eef, np.float64)[:3]) * DISPLACEMENT_SCALE
    return np.concatenate([commanded, moved]).astype(np.float32)


def feedback_for_samples(episode_ids: Sequence[Hashable], chunk_indices: Sequence[int],
                         proprio: np.ndarray, action_chunks: np.ndarray) -> np.ndarray:
    """Rows of a samples table in any order -> [N, 6]: each row's feedback from the row of the same
    episode with chunk_index - 1 (zeros when that row is absent). proprio [N, >=3] (eef first);
    action_chunks [N, T*A] or [N, T, A]. (episode id, chunk index) must be unique: pass
    (run_id, episode_key) pairs, because collections on perturbed starts reuse the keys."""
    index = {}
    for row, key in enumerate(zip(episode_ids, chunk_indices)):
        if key in index:
            raise ValueError(f"feedback_for_samples: two samples for episode {key[0]!r} chunk {key[1]}; "
                             f"expected one per (episode, chunk): pass (run_id, episode_key) as the episode id")
        index[key] = row
    out = np.zeros((len(index), MOTION_FEEDBACK_DIM), np.float32)
    for (key, chunk), row in index.items():
        previous = index.get((key, chunk - 1))
        if previous is not None:
            out[row] = motion_feedback(action_chunks[previous], proprio[previous, :3], proprio[row, :3])
    return out
