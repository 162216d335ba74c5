"""What an indexing job has to do: the scan compared with the catalog.

Each scanned file is new, changed (its row is replaced), unchanged (perhaps
relabelled), an alias of a file already catalogued under another path (a
symlink or hard link: not added twice), or a catalogued image moved or renamed
(`renames`: its row keeps its id and vector). The plan is the reader of the job
in `jobs`; it reads the catalog and touches no file but to compare identities
(and to hash a file whose size is that of a catalogued image whose file left).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.ingest.renames import find_moves
from pipeline.inputs.scan import ScannedFile
from pipeline.store import reads, repair


@dataclass
class Plan:
    """What a job has to do, from comparing the scan with the catalog."""

    todo: list[ScannedFile] = field(default_factory=list)  # to decode (and embed)
    replaced: dict[str, int] = field(default_factory=dict)  # changed file: path -> old id
    relabel: dict[int, str | None] = field(default_factory=dict)
    unchanged: int = 0
    aliases: int = 0  # a file already catalogued under another path
    keys: dict[str, str | None] = field(default_factory=dict)  # path -> file identity
    # Moved or renamed images: row id -> its new path, mtime, file_key and label.
    moved: dict[int, dict[str, Any]] = field(default_factory=dict)
    displaced: list[int] = field(default_factory=list)  # rows a moved file took the path of


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def make_plan(db, scanned: list[ScannedFile], retry_failed: bool) -> Plan:
    """Split scanned files into new, changed, unchanged, relabelled, aliases and moved."""
    existing = reads.rows_by_path(db)
    by_key: dict[str, dict[str, Any]] | None = None  # read only if some file is new
    claimed: dict[str, str] = {}  # file identity -> first path of it in this scan
    plan = Plan()
    fresh: list[tuple[ScannedFile, str | None]] = []  # new or changed: moved, else to embed
    for f in scanned:
        row = existing.get(f.path)
        same = row and row["size"] == f.size and row["mtime"] == f.mtime
        if same and not (retry_failed and row["status"] == "failed"):
            plan.unchanged += 1
            if row["label"] != f.label:
                plan.relabel[row["id"]] = f.label
            continue
        key = repair.file_key(f.path)
        if row:
            plan.replaced[f.path] = row["id"]
        elif key:
            if by_key is None:
                by_key = reads.rows_by_file_key(db)
            twin = by_key.get(key)
            if key in claimed or (twin and _same_file(twin["path"], f.path)):
                plan.aliases += 1
                continue
        if key:
            claimed[key] = f.path
        fresh.append((f, key))

    def keyed() -> dict[str, dict[str, Any]]:
        return by_key if by_key is not None else reads.rows_by_file_key(db)

    moves = find_moves(fresh, existing, keyed, {f.path: f for f in scanned}) if fresh else {}
    for f, key in fresh:
        if f.path in moves:
            plan.moved[moves[f.path]] = {
                "path": f.path, "mtime": f.mtime, "file_key": key, "label": f.label,
            }  # fmt: skip
            continue
        plan.keys[f.path] = key
        plan.todo.append(f)
    # A row whose path a moved file took is dropped with the move, unless it moved too; a
    # file left where a row moved away from is new, with nothing to replace.
    gone = {moves[path] for path in moves}
    plan.displaced = [i for p, i in plan.replaced.items() if p in moves and i not in gone]
    plan.replaced = {p: i for p, i in plan.replaced.items() if p not in moves and i not in gone}
    return plan
