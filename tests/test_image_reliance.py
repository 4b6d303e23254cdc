"""bench/image_reliance.py's pairing: each sample's partner is a sample of the same task and chunk
index from another episode, so a swapped image shows the same stage of the same task with the
objects elsewhere; a sample with no such partner keeps its own (and is left out of the scores)."""
from __future__ import annotations

from bench.image_reliance import partner_rows


def test_partners_share_task_and_chunk_and_come_from_another_episode():
    tasks = [0, 0, 0, 0, 0, 1, 1, 1]
    chunks = [0, 1, 0, 1, 0, 0, 0, 3]
    episodes = ["a", "a", "b", "b", "c", "d", "e", "d"]
    partner = partner_rows(tasks, chunks, episodes)
    for i, j in enumerate(partner):
        if j != i:
            assert (tasks[j], chunks[j]) == (tasks[i], chunks[i]) and episodes[j] != episodes[i]
    assert partner[7] == 7                              # the only chunk-3 sample of task 1
    assert all(partner[i] != i for i in range(7))
    assert sorted(partner[i] for i in (0, 2, 4)) == [0, 2, 4]     # a cycle: every image is used once
