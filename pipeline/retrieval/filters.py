"""Search filters: which images a search may return (folders, labels, dates), as catalog ids.

A `Filter` (`cbir search --under/--label/--since/--until`, the API's keyword
options, the web page's folder and date fields) is checked where it is made
(`make_filter`: one line for a bad value) and resolved against the catalog to the
sorted ids of the indexed images that pass it (`matching`): one SQL pass over the
images rows. The ranking then searches only those ids (`restricted`), so a
filtered search returns k results whenever k images match.

- `under`: folders; an image matches when its path is inside one of them (the
  folder with a separator after it, so /a/b does not match /a/bc). Paths are made
  absolute as `cbir index` records them (not resolved through symlinks).
- `labels`: an image matches when its label is one of them.
- `since` / `until`: the image's date (`taken_at`: its EXIF date, else its file's
  mtime when indexed; rows from before schema 6 use their mtime until the next
  `cbir index` dates them) within the range, both ends included. A date alone
  (2024-05-01) means the whole day: from its first moment for `since`, to its last
  for `until`. A date or time without an offset is local time; one with an offset
  (2024-05-01T10:00+02:00, or Z) is that moment.

Folders, labels and dates combine with AND; several folders, or several labels,
with OR.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

import numpy as np

from pipeline.errors import CbirError
from pipeline.store import reads, seals
from pipeline.store.collection import Collection

KEPT = 16  # filters whose ids a collection keeps (each at most 8 bytes per image)
MAX_TERMS = 64  # folders, or labels, in one filter: each is a term of one SQL query
MAX_TEXT = 4096  # characters of one folder or label
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_MOMENT = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?", re.ASCII
)
DATE_FORMS = "a date like 2024-05-01 or a time like 2024-05-01T13:45 (local, or with Z or +02:00)"


@dataclass(frozen=True)
class Filter:
    """What a search may return; the empty filter passes every image. `since` and `until`
    are unix seconds, both included (`make_filter` turns a day into its first and last
    moments); `under` holds absolute folder paths."""

    under: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.under or self.labels) or self.since is not None or self.until is not None

    def describe(self) -> dict[str, Any]:
        """The filter as an answer shows it (JSON): the parts given, dates in ISO local time."""
        out: dict[str, Any] = {}
        if self.under:
            out["under"] = list(self.under)
        if self.labels:
            out["labels"] = list(self.labels)
        for key in ("since", "until"):
            value = getattr(self, key)
            if value is not None:
                try:
                    local = datetime.fromtimestamp(value).astimezone()
                    out[key] = local.isoformat(timespec="seconds")
                except (ValueError, OverflowError, OSError):  # 9999-12-31 with an offset
                    out[key] = value  # past what local time can show: the unix seconds
        return out


def _texts(name: str, values: Any) -> tuple[str, ...]:
    """One or several non-empty strings (no NUL), each bounded, at most MAX_TERMS."""
    if values is None:
        return ()
    if isinstance(values, str | os.PathLike):
        values = [values]
    if not isinstance(values, list | tuple):
        raise CbirError(
            f"{name} must be a string or a list of strings, got {type(values).__name__}"
        )
    if len(values) > MAX_TERMS:
        raise CbirError(f"{name} names {len(values)} values; at most {MAX_TERMS}")
    out = []
    for v in values:
        text = os.fspath(v) if isinstance(v, os.PathLike) else v
        if not isinstance(text, str) or not text or "\0" in text or len(text) > MAX_TEXT:
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise CbirError(
                f"{name} must be a non-empty text of at most {MAX_TEXT} characters, got {shown}"
            )
        out.append(text)
    return tuple(dict.fromkeys(out))


def parse_date(value: Any, name: str, end: bool = False) -> float | None:
    """Unix seconds of a date or time (see the module docstring): a day is its first moment,
    or with `end` its last; a naive one is local time. None stays None; CbirError otherwise."""
    if value is None:
        return None
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    problem = CbirError(f"{name} must be {DATE_FORMS}, got {shown}")
    try:
        if isinstance(value, str):
            text = value.strip()
            if _DAY.fullmatch(text):
                value = date.fromisoformat(text)
            elif _MOMENT.fullmatch(text):
                value = datetime.fromisoformat(text.replace(" ", "T", 1))
            else:
                raise problem
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime.combine(value, time.max if end else time.min)
        if not isinstance(value, datetime):
            raise problem
        return value.timestamp()
    except (ValueError, OverflowError, OSError):  # 2024-02-30, year 1 in some zones
        raise problem from None


def make_filter(under: Any = (), labels: Any = (), since: Any = None, until: Any = None) -> Filter:
    """A checked `Filter` from what a user gives (strings, paths, dates); CbirError (one
    line) for a bad value, or a `since` after `until`."""
    folders = tuple(os.path.abspath(p) for p in _texts("under", under))
    f = Filter(
        under=tuple(dict.fromkeys(folders)),
        labels=_texts("label", labels),
        since=parse_date(since, "since"),
        until=parse_date(until, "until", end=True),
    )
    if f.since is not None and f.until is not None and f.since > f.until:
        raise CbirError(f"since ({since}) is after until ({until}): no image can match")
    return f


def _prefix(folder: str) -> bytes:
    """A folder as the start of the paths inside it, as bytes (a name stored as a BLOB,
    not UTF-8, is compared by its bytes like any other)."""
    return os.fsencode(folder.rstrip(os.sep) + os.sep)


def matching(coll: Collection, f: Filter) -> np.ndarray:
    """Sorted ids of the indexed images that pass `f` (read-only), kept for the last
    KEPT filters until the rows change: a page of searches with one filter resolves it
    once (13-31 ms of SQL at 100k rows)."""
    lock, kept = coll.cached(("filters",), lambda: (threading.Lock(), OrderedDict()))
    key = (f, coll.rows_state)
    with lock:
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
    ids = _matching(coll, f)
    ids.flags.writeable = False  # shared by every search with this filter
    with lock:
        kept[key] = ids
        while len(kept) > KEPT:
            kept.popitem(last=False)
    return ids


def _matching(coll: Collection, f: Filter) -> np.ndarray:
    """`matching` itself: every row checked first, once per generation (a damaged path,
    label or date would pass or fail the filter unseen), then one SQL pass."""
    coll.check_rows()
    db = coll.db
    where, params = ["status = 'indexed'", "id < ?"], [reads.next_id(db)]
    if f.under:
        prefixes = [_prefix(p) for p in f.under]
        where.append(
            "(" + " or ".join("substr(cast(path as blob), 1, ?) = ?" for _ in prefixes) + ")"
        )
        params += [x for p in prefixes for x in (len(p), p)]
    if f.labels:
        where.append(f"label in ({', '.join('?' * len(f.labels))})")
        params += list(f.labels)
    # Rows from before schema 6 have no date until the next `cbir index`: their mtime.
    when = "coalesce(taken_at, mtime)" if seals.has_column(db, "taken_at") else "mtime"
    if f.since is not None:
        where.append(f"{when} >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append(f"{when} <= ?")
        params.append(f.until)
    sql = f"select id from images where {' and '.join(where)} order by id"
    return np.asarray([r[0] for r in db.conn.execute(sql, params)], dtype=np.int64)


def folders(coll: Collection, limit: int = 200) -> list[dict[str, Any]]:
    """The folders that hold indexed images directly, the `limit` fullest (for a folder
    picker), as [{"folder", "images"}] sorted by folder; kept until the rows change."""

    def make() -> list[dict[str, Any]]:
        coll.check_rows()  # no folder of a damaged row is offered
        db = coll.db
        # rtrim(path, every character but '/') leaves the path up to its last separator.
        sql = (
            "select rtrim(path, replace(path, '/', '')) as folder, count(*) as n from images "
            "where status = 'indexed' and id < ? and typeof(path) = 'text' "
            "group by folder order by n desc, folder limit ?"
        )
        rows = db.conn.execute(sql, [reads.next_id(db), limit]).fetchall()
        found = [{"folder": r[0].rstrip("/") or "/", "images": r[1]} for r in rows if r[0]]
        return sorted(found, key=lambda r: r["folder"])

    # Made again when the rows version moves too: a renamed folder keeps the generation.
    kept = coll.cached(("folders", limit), dict)
    state = coll.rows_state
    if kept.get("state") != state:
        kept.update(value=make(), state=state)
    return kept["value"]
