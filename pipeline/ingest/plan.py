"""What an indexing job has to do: the scan compared with the catalog.

Each scanned file is new, changed (its row is replaced), unchanged (perhaps
relabelled) or an alias of a file already catalogued under another path (a
symlink or hard link: not added twice). The plan is the reader of the job in
`jobs`; it reads the catalog and touches no file but to compare identities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

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


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def make_plan(db, scanned: list[ScannedFile], retry_failed: bool) -> Plan:
    """Split scanned files into new, changed, unchanged, relabelled and aliases."""
    existing = reads.rows_by_path(db)
    by_key: dict[str, dict[str, Any]] | None = None  # read only if some file is new
    claimed: dict[str, str] = {}  # file identity -> first path of it in this scan
    plan = Plan()
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
        plan.keys[f.path] = key
        plan.todo.append(f)
    return plan
