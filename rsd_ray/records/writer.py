"""Append-only Parquet records: every flush writes a new part file, atomically (temp + rename),
so a killed process loses only what it had not flushed and never leaves a half-written file
that a reader would trip over. Reading back de-duplicates nothing: the driver guarantees
one row per episode key by skipping recorded keys on resume.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from rsd_ray.records.schema import (
    ADDED_SAMPLE_FIELDS, CHUNK_SCHEMA, CHUNKS_DIR, EPISODE_SCHEMA, EPISODES_DIR, SAMPLE_SCHEMA, SAMPLES_DIR,
)

SCHEMAS = {EPISODES_DIR: EPISODE_SCHEMA, CHUNKS_DIR: CHUNK_SCHEMA, SAMPLES_DIR: SAMPLE_SCHEMA}
ADDED_FIELDS = {SAMPLES_DIR: ADDED_SAMPLE_FIELDS}


class CorruptRecordsError(RuntimeError):
    pass


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    missing = [f.name for f in schema if not f.nullable and any(r.get(f.name) is None for r in rows)]
    if missing:
        raise ValueError(f"records are missing required fields {missing}")
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _write_part(directory: Path, table: pa.Table) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)   # atomic on POSIX: readers see all of the part or none
    return directory / name


class RecordWriter:
    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)

    def write_episodes(self, rows: list[dict[str, Any]]) -> Path | None:
        return _write_part(self.run_dir / EPISODES_DIR, _table(rows, EPISODE_SCHEMA)) if rows else None

    def write_chunks(self, rows: list[dict[str, Any]]) -> Path | None:
        return _write_part(self.run_dir / CHUNKS_DIR, _table(rows, CHUNK_SCHEMA)) if rows else None

    def write_samples(self, rows: list[dict[str, Any]]) -> Path | None:
        return _write_part(self.run_dir / SAMPLES_DIR, _table(rows, SAMPLE_SCHEMA)) if rows else None


def _part_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("part-*.parquet")) if directory.is_dir() else []


def read_table(run_dir: str | os.PathLike[str], kind: str = EPISODES_DIR,
               columns: Iterable[str] | None = None) -> pa.Table:
    """All parts of one record kind as one table with the run's schema. A part that is not
    valid Parquet, or has foreign columns, raises CorruptRecordsError naming the file."""
    if kind not in SCHEMAS:
        raise ValueError(f"record kind {kind!r}; expected one of {', '.join(SCHEMAS)}")
    schema = SCHEMAS[kind]
    files = _part_files(Path(run_dir) / kind)
    if not files:
        return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    for path in files:
        try:
            file_schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several types for garbage files
            raise CorruptRecordsError(f"{path} is not a readable Parquet file ({exc}); move it away "
                                      f"to resume: the episodes in it will then be run again") from exc
        missing = set(schema.names) - set(file_schema.names) - ADDED_FIELDS.get(kind, frozenset())
        if missing:
            raise CorruptRecordsError(f"{path} lacks columns {sorted(missing)} of the rsd_ray {kind} schema; "
                                      f"it was not written by this version of rsd_ray")
    dataset = ds.dataset([str(p) for p in files], schema=schema, format="parquet")
    return dataset.to_table(columns=list(columns) if columns is not None else None)


def recorded_keys(run_dir: str | os.PathLike[str]) -> set[str]:
    return set(read_table(run_dir, EPISODES_DIR, columns=["episode_key"]).column("episode_key").to_pylist())


def read_samples(run_dirs: Iterable[str | os.PathLike[str]]) -> pa.Table:
    """Training samples of one or more runs, one row per (run, episode key, chunk index): rows of
    an episode that crashed between its samples and its episode row, and was re-run, are
    dropped, as are samples of episodes that never got an episode row."""
    tables = []
    for run_dir in run_dirs:
        samples = read_table(run_dir, SAMPLES_DIR)
        if samples.num_rows == 0:
            continue
        keys = recorded_keys(run_dir)
        seen: set[tuple[str, int]] = set()
        keep = []
        for i, (key, chunk) in enumerate(zip(samples.column("episode_key").to_pylist(),
                                             samples.column("chunk_index").to_pylist())):
            if key in keys and (key, chunk) not in seen:
                seen.add((key, chunk))
                keep.append(i)
        tables.append(samples.take(keep))
    return pa.concat_tables(tables) if tables else SAMPLE_SCHEMA.empty_table()
