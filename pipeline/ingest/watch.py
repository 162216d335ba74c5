"""What changes under the folders `cbir watch` keeps indexed: file events, debounced into batches.

`Changes` watches the roots with `watchdog` (inotify on Linux) and counts the events
that can change what an index job finds: an image file created, written, closed after
writing, moved or deleted, a CSV changed (a manifest or a label file), and a folder
created, moved or deleted (a folder moved in brings no event per file). Opening and
reading a file is no change: the indexing job itself reads every new image, and would
otherwise start the next batch. `wait` returns once events have come and then none for
`debounce` seconds (a copy in progress keeps writing), or `max_wait` seconds after the
first, so a folder that never settles is still indexed.

Only events are here; what a batch does (a full indexing job over the roots, the one
writer) is `api.watching`'s, so a missed or unreadable event costs nothing but the
wait until the next event or periodic rescan.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import CbirError, path_problem
from pipeline.inputs.scan import is_image_name

# Event types that may change what a scan finds (watchdog's names); opened and
# closed_no_write are reads.
_FILE_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})
_FOLDER_EVENTS = frozenset({"created", "moved", "deleted"})
_POLL = 0.2  # seconds between looks at `stop` while waiting


def _relevant(event) -> bool:
    """Whether a watchdog event can change what an indexing job finds."""
    if event.is_directory:
        return event.event_type in _FOLDER_EVENTS
    if event.event_type not in _FILE_EVENTS:
        return False
    names = [os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")]
    return any(is_image_name(n) or n.lower().endswith(".csv") for n in names if n)


def watched_folders(roots: list[str]) -> list[tuple[str, bool]]:
    """(folder, recursive) to watch for each root: a folder and all below it; an image file
    or a manifest CSV, its own folder only (a manifest's files elsewhere are caught by
    the periodic rescan). A root that does not exist is one line, as the scan says it."""
    out: dict[str, bool] = {}
    for root in roots:
        path = os.path.abspath(root)
        if not os.path.exists(path):
            raise CbirError(path_problem(path, folder=True) or f"no such file or folder: {root}")
        if os.path.isdir(path):
            out[path] = True
        else:
            parent = str(Path(path).parent)
            out[parent] = out.get(parent, False)
    return list(out.items())


class Changes:
    """The relevant events under some folders since the last batch (a context manager:
    watching starts on entry, before the first full scan, so nothing falls between)."""

    def __init__(self, roots: list[str]):
        self._folders = watched_folders(roots)
        self._cond = threading.Condition()
        self._count = 0
        self._first = self._last = 0.0
        self._observer = None

    def __enter__(self) -> Changes:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        changes = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if _relevant(event):
                    changes._note()

        self._observer = Observer()
        self._observer.daemon = True
        folders = ", ".join(folder for folder, _ in self._folders)
        try:
            for folder, recursive in self._folders:
                self._observer.schedule(Handler(), folder, recursive=recursive)
            self._observer.start()
        except OSError as e:  # inotify's limits (ENOSPC, EMFILE), a folder gone meanwhile
            self.__exit__(None, None, None)
            raise CbirError(
                f"cannot watch {folders}: {e.strerror or e} (on Linux, a large folder tree "
                "may need a higher fs.inotify.max_user_watches)"
            ) from None
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(timeout=5)

    def _note(self) -> None:
        with self._cond:
            now = time.monotonic()
            if not self._count:
                self._first = now
            self._count += 1
            self._last = now
            self._cond.notify_all()

    def wait(
        self, debounce: float, max_wait: float, timeout: float | None, stop: threading.Event
    ) -> int:
        """Block until a batch is due; returns its number of events (0: `timeout` seconds
        passed without one, or `stop` was set). Events that come while the batch runs
        count towards the next one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not stop.is_set():
                now = time.monotonic()
                if self._count:
                    due = min(self._last + debounce, self._first + max_wait)
                    if now >= due:
                        count, self._count = self._count, 0
                        return count
                    self._cond.wait(min(due - now, _POLL))
                elif deadline is not None and now >= deadline:
                    return 0
                else:
                    left = _POLL if deadline is None else min(deadline - now, _POLL)
                    self._cond.wait(left)
        return 0
