"""Load run directories (manifest.json + episodes/ + chunks/ Parquet) into typed DataFrames.

A run directory is what the evaluator writes (see rsd_ray.records.schema). Records are
append-only, so a retried or resumed episode can appear more than once; a loaded run keeps the
last attempt of every episode_key and says how many rows it dropped.

Column types: strings are pandas 'string', integer fields that may be null are nullable
'Int32'/'Int64', the never-null key fields (task_id, trial, chunk_index) are plain int32,
floats are float64 with NaN for null, `finished_at` is datetime64[ms, UTC]. Every frame gets a
`run` column (the run's label) and a `decode_label` column ('speculative K=3 tau=0.7', ...).
"""
from __future__ import annotations

import glob as globlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rsd_ray.records.schema import (
    CHUNK_SCHEMA,
    CHUNKS_DIR,
    EPISODE_SCHEMA,
    EPISODES_DIR,
    MANIFEST_FILE,
    SCHEMA_VERSION,
)

OUTCOMES: tuple[str, ...] = ("success", "timeout", "error")  # same as rsd_ray.protocol.OUTCOMES
PART_GLOB = "part-*.parquet"

# Nullable pandas dtypes keep "missing" distinct from 0 / False; floats keep NaN.
_PANDAS_TYPES: dict[pa.DataType, Any] = {
    pa.string(): pd.StringDtype(),
    pa.large_string(): pd.StringDtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


class RecordsError(ValueError):
    """A run directory or Parquet file that is not a readable rsd_ray run."""


class EmptyRunError(RecordsError):
    """A run directory with no episode records (yet)."""


class MixedProtocolError(ValueError):
    """Runs recorded under different protocols were asked to be compared."""


@dataclass(frozen=True)
class Run:
    """One loaded run. `episodes` has one row per episode (last attempt), `chunks` one row per
    chunk of those attempts (empty, with typed columns, when the run wrote no chunk records)."""

    path: Path
    label: str
    manifest: dict
    episodes: pd.DataFrame
    chunks: pd.DataFrame
    notes: tuple[str, ...] = field(default=())

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or _first(self.episodes, "run_id") or self.label)

    @property
    def protocol_hash(self) -> str | None:
        """Manifest's protocol_hash; else the episodes' config_hash (the same hash, per row)."""
        value = self.manifest.get("protocol_hash")
        if value:
            return str(value)
        hashes = _distinct(self.episodes, "config_hash")
        if len(hashes) == 1:
            return hashes[0]
        if len(hashes) > 1:
            return "mixed:" + ",".join(hashes)
        return None

    @property
    def decode_label(self) -> str:
        labels = _distinct(self.episodes, "decode_label")
        return labels[0] if len(labels) == 1 else " / ".join(labels)


def decode_label(mode: Any, acceptance: Any = None, draft_layers: Any = None) -> str:
    """Short human label of a decoding variant, used in tables, legends and point labels."""
    mode = _clean(mode) or "unknown mode"
    if mode != "speculative":
        return mode
    parts = ["speculative"]
    k = _clean(draft_layers)
    if k is not None:
        parts.append(f"K={int(k)}")
    acceptance = _clean(acceptance)
    if acceptance:
        if acceptance.startswith("threshold:"):
            parts.append("tau=" + acceptance.split(":", 1)[1])
        else:
            parts.append(acceptance)
    return " ".join(parts)


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Load one run directory. Raises RecordsError (EmptyRunError when nothing is recorded)."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RecordsError(f"run directory {str(run_dir)!r} does not exist or is not a directory; "
                           f"expected a directory holding {MANIFEST_FILE} and {EPISODES_DIR}/{PART_GLOB}")
    notes: list[str] = []
    manifest = _read_manifest(run_dir, notes)
    episode_files = sorted((run_dir / EPISODES_DIR).glob(PART_GLOB))
    if not episode_files:
        if not (run_dir / MANIFEST_FILE).exists():
            inside = sorted(p.name for p in run_dir.iterdir() if _looks_like_run(p))
            hint = (f"; it holds run directories ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}): "
                    f"pass {str(run_dir / '*')!r} to load them all" if inside else "")
            raise RecordsError(f"{str(run_dir)!r} is not a run directory: it has neither {MANIFEST_FILE} "
                               f"nor {EPISODES_DIR}/{PART_GLOB}{hint}")
        raise EmptyRunError(f"run {str(run_dir)!r} has no episode records yet "
                            f"({EPISODES_DIR}/{PART_GLOB}: 0 files); nothing to analyse")
    episodes = _read_parts(episode_files, EPISODE_SCHEMA, "episode")
    if episodes.num_rows == 0:
        raise EmptyRunError(f"run {str(run_dir)!r} has {len(episode_files)} episode file(s) but 0 rows; "
                            f"nothing to analyse")
    chunk_files = sorted((run_dir / CHUNKS_DIR).glob(PART_GLOB))
    chunks = _read_parts(chunk_files, CHUNK_SCHEMA, "chunk") if chunk_files else CHUNK_SCHEMA.empty_table()

    run_label = label or run_dir.resolve().name
    episodes_df = _episodes_frame(episodes, run_dir, manifest, notes)
    chunks_df = _chunks_frame(chunks, episodes_df, notes)
    episodes_df.insert(0, "run", pd.array([run_label] * len(episodes_df), dtype="string"))
    chunks_df.insert(0, "run", pd.array([run_label] * len(chunks_df), dtype="string"))
    return Run(path=run_dir, label=run_label, manifest=manifest, episodes=episodes_df,
               chunks=chunks_df, notes=tuple(notes))


def resolve_run_dirs(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run directories named by a path, a glob, a comma-separated list of either, or a list.
    A glob keeps only matches that look like run directories (manifest or episodes/)."""
    if isinstance(spec, (str, Path)):
        items = [s.strip() for s in str(spec).split(",") if s.strip()]
    else:
        items = [str(s) for s in spec]
    dirs: list[Path] = []
    for item in items:
        if globlib.has_magic(item):
            matches = [Path(m) for m in sorted(globlib.glob(item)) if _looks_like_run(Path(m))]
            if not matches:
                raise RecordsError(f"glob {item!r} matches no run directory; expected directories "
                                   f"holding {MANIFEST_FILE} or {EPISODES_DIR}/")
            dirs.extend(matches)
        else:
            dirs.append(Path(item))
    if not dirs:
        raise RecordsError(f"no run directories given (got {spec!r})")
    # The same directory named twice would double-count every episode.
    unique: dict[Path, Path] = {}
    for d in dirs:
        unique.setdefault(d.resolve(), d)
    return list(unique.values())


def load_runs(spec: str | Path | Iterable[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Load many runs (see resolve_run_dirs). Labels default to directory names, made unique."""
    dirs = resolve_run_dirs(spec)
    if labels is not None and len(labels) != len(dirs):
        raise ValueError(f"got {len(labels)} labels for {len(dirs)} run directories ({[str(d) for d in dirs]})")
    names = list(labels) if labels is not None else _unique_names(dirs)
    return [load_run(d, label=name) for d, name in zip(dirs, names)]


def merge_runs(runs: Sequence[Run], label: str | None = None, allow_mixed_protocols: bool = False) -> Run:
    """One Run out of runs that evaluated one policy in pieces (trials 30-39 and 40-49, say), so it
    can be compared as a whole. Refuses runs recorded under different protocols, and runs that
    share an episode key: merging them would count that episode twice."""
    runs = _as_list(runs)
    if len(runs) == 1 and label is None:
        return runs[0]
    check_same_protocol(runs, allow_mixed_protocols)
    owner: dict[str, str] = {}
    for run in runs:
        for key in run.episodes["episode_key"]:
            if key in owner:
                raise RecordsError(f"runs {owner[key]!r} and {run.label!r} both hold episode {key!r}; merging "
                                   f"them would count it twice. Merge runs over disjoint trials, or "
                                   f"resume one run instead of starting a second over the same trials")
            owner[key] = run.label
    label = label or "+".join(r.label for r in runs)
    manifest = dict(runs[0].manifest, run_id="+".join(r.run_id for r in runs),
                    merged_from=[str(r.path) for r in runs])
    notes = tuple(f"{r.label}: {n}" for r in runs for n in r.notes) + (
        f"merged from {', '.join(str(r.path) for r in runs)}",)
    episodes, chunks = episodes_frame(runs), chunks_frame(runs)
    return Run(path=runs[0].path, label=label, manifest=manifest,
               episodes=episodes.assign(run=pd.array([label] * len(episodes), dtype="string")),
               chunks=chunks.assign(run=pd.array([label] * len(chunks), dtype="string")), notes=notes)


def episodes_frame(runs: Run | Sequence[Run]) -> pd.DataFrame:
    """All runs' episode rows in one frame (the `run` column tells them apart)."""
    return _concat([r.episodes for r in _as_list(runs)])


def chunks_frame(runs: Run | Sequence[Run]) -> pd.DataFrame:
    return _concat([r.chunks for r in _as_list(runs)])


def check_same_protocol(runs: Sequence[Run], allow_mixed_protocols: bool = False) -> None:
    """Refuse to compare runs whose protocol hashes differ (unknown counts as its own value)."""
    hashes = {r.label: r.protocol_hash for r in runs}
    if len(set(hashes.values())) <= 1 or allow_mixed_protocols:
        return
    listing = ", ".join(f"{label}: {h or 'unknown'}" for label, h in hashes.items())
    raise MixedProtocolError(
        f"runs were recorded under different protocols ({listing}); their success rates and "
        f"latencies are not comparable. Compare runs with the same protocol_hash, or pass "
        f"allow_mixed_protocols=True (--allow-mixed-protocols) if the difference is intended")


# ---------------------------------------------------------------------------------------------

def _read_manifest(run_dir: Path, notes: list[str]) -> dict:
    path = run_dir / MANIFEST_FILE
    if not path.exists():
        notes.append(f"no {MANIFEST_FILE}: config, versions and protocol_hash come from the records only")
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path} is not valid JSON ({exc}); expected the run manifest object") from exc
    if not isinstance(manifest, dict):
        raise RecordsError(f"{path} holds a JSON {type(manifest).__name__}; expected an object with "
                           f"run_id, config, protocol_hash, versions")
    return manifest


def _read_parts(files: Sequence[Path], schema: pa.Schema, kind: str) -> pa.Table:
    tables = [_read_part(f, schema, kind) for f in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _read_part(path: Path, schema: pa.Schema, kind: str) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise RecordsError(f"{path} is not a readable Parquet file ({exc}); expected {kind} records "
                           f"written by rsd_ray.records") from exc
    names = set(table.column_names)
    required = [f.name for f in schema if not f.nullable]
    missing_required = [n for n in required if n not in names]
    if missing_required:
        raise RecordsError(
            f"{path} is not an rsd_ray {kind} record file: it lacks the required column(s) "
            f"{missing_required} (it has {sorted(names)[:12]}{' ...' if len(names) > 12 else ''}); "
            f"expected the {kind.upper()}_SCHEMA of rsd_ray.records.schema (version {SCHEMA_VERSION})")
    columns = []
    for f in schema:
        if f.name not in names:
            # Older writers may lack optional columns; null keeps them out of every statistic.
            columns.append(pa.nulls(table.num_rows, type=f.type))
            continue
        column = table.column(f.name)
        if not column.type.equals(f.type):
            try:
                column = column.cast(f.type)
            except (pa.ArrowException, ValueError) as exc:
                raise RecordsError(f"{path}: column {f.name!r} has type {column.type}; expected {f.type} "
                                   f"({kind.upper()}_SCHEMA) and it does not convert ({exc})") from exc
        if not f.nullable and column.null_count:
            raise RecordsError(f"{path}: column {f.name!r} has {column.null_count} null value(s); "
                               f"{kind.upper()}_SCHEMA requires a value in every row")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas(types_mapper=_PANDAS_TYPES.get)
    for f in table.schema:
        if f.nullable:
            continue
        # Never-null keys as plain numpy types: cheaper, and what users expect from arithmetic.
        if pa.types.is_integer(f.type):
            df[f.name] = df[f.name].astype(np.int32 if f.type == pa.int32() else np.int64)
        elif pa.types.is_boolean(f.type):
            df[f.name] = df[f.name].astype(bool)
    return df


def _episodes_frame(table: pa.Table, run_dir: Path, manifest: dict, notes: list[str]) -> pd.DataFrame:
    df = _to_pandas(table)
    default_k = _nested(manifest, "config", "decode", "draft_layers")
    if default_k is not None:
        speculative = (df["decoding_mode"] == "speculative").fillna(False)
        df.loc[speculative & df["draft_layers"].isna(), "draft_layers"] = int(default_k)
    unknown = sorted(set(df["outcome"].unique()) - set(OUTCOMES))
    if unknown:
        raise RecordsError(f"{run_dir}: episode outcome(s) {unknown} are not one of {list(OUTCOMES)}")
    mismatch = df["success"] != (df["outcome"] == "success")
    if mismatch.any():
        keys = df.loc[mismatch, "episode_key"].head(3).tolist()
        raise RecordsError(f"{run_dir}: {int(mismatch.sum())} episode row(s) have success != "
                           f"(outcome == 'success'), e.g. {keys}; the records are inconsistent")
    # Keep the last attempt per episode: a retry or a resume after a crash appends a new row.
    order = df.assign(_attempt=df["attempt"].fillna(0).astype("int64"),
                      _finished=df["finished_at"].fillna(pd.Timestamp(0, tz="UTC")),
                      _row=np.arange(len(df)))
    order = order.sort_values(["episode_key", "_attempt", "_finished", "_row"])
    kept = order.drop_duplicates("episode_key", keep="last")
    if len(kept) < len(df):
        notes.append(f"{len(df) - len(kept)} earlier attempt row(s) of re-run episodes dropped "
                     f"(kept the last attempt of each episode_key)")
    kept = kept.sort_values(["_finished", "_row"]).drop(columns=["_attempt", "_finished", "_row"])
    kept = kept.reset_index(drop=True)
    kept["decode_label"] = pd.array(
        [decode_label(m, a, k) for m, a, k in zip(kept["decoding_mode"], kept["acceptance"], kept["draft_layers"])],
        dtype="string")
    # Finish order within the run: the x axis of "latency over episodes".
    kept["episode_index"] = np.arange(len(kept), dtype=np.int64)
    return kept


def _chunks_frame(table: pa.Table, episodes: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    df = _to_pandas(table)
    attempts = episodes[["episode_key", "attempt", "draft_layers", "decode_label", "episode_index"]]
    if len(df):
        # Keep the chunks of the kept attempt; a null attempt on either side matches any attempt.
        merged = df.merge(attempts.rename(columns={"attempt": "_kept_attempt"}), on="episode_key", how="left")
        in_episode = merged["episode_index"].notna()
        same_attempt = (merged["attempt"].isna() | merged["_kept_attempt"].isna()
                        | (merged["attempt"] == merged["_kept_attempt"]).fillna(False))
        keep = (in_episode & same_attempt).to_numpy(dtype=bool)
        if not keep.all():
            notes.append(f"{int((~keep).sum())} chunk row(s) of unfinished or superseded attempts dropped")
        df = merged.loc[keep].drop(columns=["_kept_attempt"]).reset_index(drop=True)
    else:
        df = df.assign(draft_layers=pd.array([], dtype="Int32"), decode_label=pd.array([], dtype="string"),
                       episode_index=np.array([], dtype=np.int64))
    df["draft_layers"] = df["draft_layers"].astype("Int32")
    df["episode_index"] = df["episode_index"].astype(np.int64)
    df["decode_label"] = df["decode_label"].astype("string")
    return df


def _looks_like_run(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_FILE).exists() or (path / EPISODES_DIR).is_dir())


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    names = [d.resolve().name for d in dirs]
    if len(set(names)) == len(names):
        return names
    # Same leaf name in different parents (runs/a/latest, runs/b/latest): prefix the parent.
    names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return unique


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if len(frames) == 1:
        return frames[0].copy()
    non_empty = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(non_empty, ignore_index=True)


def _as_list(runs: Run | Sequence[Run]) -> list[Run]:
    if isinstance(runs, Run):
        return [runs]
    runs = list(runs)
    if not runs:
        raise ValueError("got an empty list of runs; expected at least one Run (see load_runs)")
    return runs


def _distinct(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df:
        return []
    return sorted(str(v) for v in df[column].dropna().unique() if str(v) != "")


def _first(df: pd.DataFrame, column: str) -> Any:
    values = _distinct(df, column)
    return values[0] if values else None


def _clean(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _nested(mapping: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping
