"""Spread ``metaham qh9 generate`` over a job array, and join the pieces: ``--shard K/N`` and ``merge``.

A *job* is the ordered list of geometries that ``generate`` would compute without ``--shard``: molecule by
molecule, conformer 0 first. A geometry's *position* ``p`` in that list (0-based) is
``molecule index * conformers + conformer``. Shard ``K`` of ``N`` (1-based, as SLURM's ``--array=1-N``
numbers its tasks) builds the whole job exactly like an unsharded run -- same molecules, seeds and displaced
geometries -- and computes only the positions :func:`assign` gives it, in position order.

Why a cost-balanced partition rather than round-robin or contiguous blocks: the wall time of a job array is
that of its slowest task, and an SCF's cost grows roughly with the cube of the orbital count, so a benzene is
worth dozens of waters. :func:`assign` is the longest-processing-time greedy rule: positions sorted by
estimated cost (``norb**3``, an integer, so every machine sorts identically), ties by position, each given to
the least-loaded shard (ties to the lowest index). The conformers of one molecule cost the same and so go
round-robin over the shards. The rule depends only on the job and ``N``, so every task of the array computes the
same partition without talking to the others.

A shard file is an ordinary generated file whose rows carry ``id = p + 1`` and whose ``meta`` table also holds
``shard`` (``"K/N"``), ``shard_geometries`` (its share), ``job`` (a fingerprint of the molecules, their
geometries and the conformer count, plus that count and the job's size) and ``job_molecules`` (the molecule
names in job order, which locate a failed geometry's position). :func:`merge` joins a complete set into the file
the unsharded run writes: an unsharded file numbers only stored rows (1, 2, ... in position order, skipping
geometries whose SCF failed), so the merged id of the row at position ``p`` is ``p + 1`` minus the failed
geometries before it.
"""
from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"K/N"`` with ``1 <= K <= N``; ``ValueError`` naming the text otherwise."""
        k, sep, n = str(text).partition("/")
        try:
            index, count = int(k), int(n)
        except ValueError:
            index = count = 0
        if not sep or count < 1 or not 1 <= index <= count:
            raise ValueError(f"shard {text!r}: expected K/N with 1 <= K <= N (e.g. 3/8; K counts from 1)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def assign(costs: Sequence[int], count: int) -> list[int]:
    """The shard (1-based) of every position, given each position's integer cost (see the module docstring)."""
    shard_of = [0] * len(costs)
    loads = [(0, s) for s in range(1, count + 1)]  # a heap of (load, shard): the least-loaded, lowest index first
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        load, s = heapq.heappop(loads)
        shard_of[position] = s
        heapq.heappush(loads, (load + costs[position], s))
    return shard_of


def job_record(
    names: Sequence[str], Zs: Sequence[np.ndarray], positions: Sequence[np.ndarray], conformers: int
) -> dict:
    """The ``job`` meta value: what makes two shard files pieces of one job (with the DFT settings)."""
    digest = hashlib.sha256(str(conformers).encode())
    for name, Z, pos in zip(names, Zs, positions):
        digest.update(name.encode() + b"\0")
        digest.update(np.ascontiguousarray(Z, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(pos, dtype=np.float64).tobytes())
    return {"fingerprint": digest.hexdigest(), "conformers": conformers, "geometries": len(names) * conformers}


# ------------------------------------------------------------------------------------------- merge


class MergeError(ValueError):
    """Shard files that cannot be joined; the message names the files."""


@dataclass
class _Input:
    path: Path
    meta: dict
    shard: Shard
    rows: list[tuple[int, str, int]]  # (rowid, name, conformer)
    failed: list[tuple[str, int]]
    schema: list[str]


def _read_input(path: Path) -> _Input:
    if not path.is_file():
        raise MergeError(f"{path}: no such file")
    with open(path, "rb") as fh:
        if not fh.read(16).startswith(b"SQLite format 3"):
            raise MergeError(f"{path}: not an SQLite file, so not a shard of metaham qh9 generate --shard")
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")} if "meta" in tables else {}
        if not {"data", "failed"} <= tables or not {"shard", "shard_geometries", "job", "job_molecules"} <= set(meta):
            raise MergeError(f"{path}: not a shard file (written by metaham qh9 generate --shard K/N)")
        rows = list(db.execute("SELECT rowid, name, conformer FROM data ORDER BY rowid"))
        failed = list(db.execute("SELECT name, conformer FROM failed"))
        schema = [r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except (sqlite3.DatabaseError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: unreadable SQLite file or meta table ({exc})") from exc
    finally:
        db.close()
    try:
        shard = Shard.parse(meta["shard"])
    except ValueError as exc:
        raise MergeError(f"{path}: {exc}") from exc
    return _Input(path, meta, shard, rows, failed, schema)


def _check_consistent(inputs: list[_Input]) -> None:
    """One job, one set of settings, each shard once: refuse anything else, naming the files."""
    first = inputs[0]
    for other in inputs[1:]:
        if other.shard.count != first.shard.count:
            raise MergeError(
                f"different jobs: {first.path} is shard {first.shard}, {other.path} is shard {other.shard}"
            )
        for key in sorted(set(first.meta) | set(other.meta)):
            if key in ("shard", "shard_geometries") or first.meta.get(key) == other.meta.get(key):
                continue
            what = "mismatched settings"
            if key.startswith("job"):
                what = "different jobs (molecules, geometries or conformers)"
            a, b = (brief(m.get(key)) for m in (first.meta, other.meta))
            raise MergeError(f"{what}: {first.path} has {key}={a}, {other.path} has {key}={b}")
        if other.schema != first.schema:
            raise MergeError(
                f"different table layouts: {first.path} and {other.path} (written by other metaham versions?)"
            )
    seen: dict[int, Path] = {}
    for item in inputs:
        if item.shard.index in seen:
            raise MergeError(f"duplicate shard {item.shard}: {seen[item.shard.index]} and {item.path}")
        seen[item.shard.index] = item.path


def brief(value: object) -> str:
    """``repr(value)`` cut to 80 characters, for error messages about long meta values."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _locate(inputs: list[_Input], names: list[str], conformers: int) -> tuple[int, list[int]]:
    """How many geometries the files hold (stored or failed), and the sorted job positions of the failed ones.

    Refuses a geometry that is not in the job, a row not at its position, and a geometry held twice.
    """
    molecule_index = {name: i for i, name in enumerate(names)}
    owner: dict[int, Path] = {}  # job position -> the file holding it
    failed_positions = []

    def locate(name: str, k: int, path: Path) -> int:
        if name not in molecule_index or not 0 <= k < conformers:
            raise MergeError(f"{path}: geometry {name} conformer {k} is not part of the job its meta table describes")
        return molecule_index[name] * conformers + k

    for item in inputs:
        located = []
        for rowid, name, k in item.rows:
            if locate(name, k, item.path) != rowid - 1:
                raise MergeError(f"{item.path}: row {rowid} ({name} conformer {k}) is not at its job position")
            located.append(rowid - 1)
        for name, k in item.failed:
            located.append(locate(name, k, item.path))
            failed_positions.append(located[-1])
        for p in located:
            if p in owner:
                raise MergeError(
                    f"duplicate geometry {names[p // conformers]} conformer {p % conformers} "
                    f"(id {p + 1}) in {owner[p]} and {item.path}"
                )
            owner[p] = item.path
    return len(owner), sorted(failed_positions)


def _write(path: Path, inputs: list[_Input], meta: dict, failed_positions: list[int]) -> None:
    """The merged file: the shards' tables, ``meta``, and every row renumbered to its unsharded id."""
    db = sqlite3.connect(path, isolation_level=None)  # explicit transactions: ATTACH cannot run inside one
    try:
        for statement in inputs[0].schema:
            db.execute(statement)
        db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        columns = [r[1] for r in db.execute("PRAGMA table_info(data)") if r[1] != "id"]
        select = ", ".join(f"d.{c}" for c in columns)
        for item in inputs:
            db.execute("ATTACH DATABASE ? AS shard", (item.path.resolve().as_uri() + "?mode=ro",))
            db.execute("BEGIN")
            db.execute("CREATE TEMP TABLE ids (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
            db.executemany(
                "INSERT INTO ids VALUES (?, ?)",
                [(rowid, rowid - bisect.bisect_left(failed_positions, rowid - 1)) for rowid, _, _ in item.rows],
            )
            db.execute(
                f"INSERT INTO data (id, {', '.join(columns)}) SELECT ids.new, {select} "
                "FROM shard.data AS d JOIN ids ON ids.old = d.rowid"
            )
            db.execute("INSERT INTO failed SELECT * FROM shard.failed")
            db.execute("DROP TABLE ids")
            db.execute("COMMIT")
            db.execute("DETACH DATABASE shard")
    finally:
        db.close()


def merge(
    out: str | os.PathLike, shards: Sequence[str | os.PathLike], allow_partial: bool = False, force: bool = False
) -> dict:
    """Join shard files into the file the unsharded ``generate`` run writes (see the module docstring).

    Refuses (``MergeError`` naming the files): an existing ``out`` unless ``force``, inputs that are not shard
    files, shards of different jobs or settings, a shard given twice, a geometry in two files, and -- unless
    ``allow_partial`` -- a missing shard or an unfinished one (an interrupted array task). The output is written
    to a temporary file beside ``out`` and renamed, so ``out`` is either complete or untouched.

    Returns:
        ``{"out", "rows", "failed", "shards", "count", "missing_shards", "unfinished_shards",
        "missing_geometries", "complete"}``.
    """
    out = Path(out)
    paths = [Path(p) for p in shards]
    if not paths:
        raise MergeError("no shard files given")
    if out.exists() and not force:
        raise MergeError(f"{out}: exists; choose another output or pass --force to replace it")
    if out.resolve() in [p.resolve() for p in paths]:
        raise MergeError(f"{out}: is also one of the shard files; choose another output")
    inputs = [_read_input(p) for p in paths]
    _check_consistent(inputs)

    job, names = inputs[0].meta["job"], inputs[0].meta["job_molecules"]
    conformers, count = int(job["conformers"]), inputs[0].shard.count
    held, failed_positions = _locate(inputs, names, conformers)
    present = {item.shard.index for item in inputs}
    missing = [f"{s}/{count}" for s in range(1, count + 1) if s not in present]
    unfinished = [
        f"{item.path} ({len(item.rows) + len(item.failed)} of {item.meta['shard_geometries']} geometries)"
        for item in inputs
        if len(item.rows) + len(item.failed) < int(item.meta["shard_geometries"])
    ]
    missing_geometries = int(job["geometries"]) - held
    if (missing or unfinished) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"missing shard(s) {', '.join(missing)}")
        if unfinished:
            parts.append(f"unfinished shard(s) {', '.join(unfinished)} (rerun their generate command to finish them)")
        raise MergeError(
            f"incomplete set of {count} shards ({missing_geometries} geometries absent): {'; '.join(parts)}; "
            "pass --allow-partial to merge what is there"
        )

    meta = {k: v for k, v in inputs[0].meta.items() if k not in ("shard", "shard_geometries", "job_molecules")}
    meta["merged_shards"] = count
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write(Path(tmp), inputs, meta, failed_positions)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {
        "out": str(out),
        "rows": sum(len(item.rows) for item in inputs),
        "failed": len(failed_positions),
        "shards": [str(p) for p in paths],
        "count": count,
        "missing_shards": missing,
        "unfinished_shards": unfinished,
        "missing_geometries": missing_geometries,
        "complete": not missing and not unfinished,
    }
