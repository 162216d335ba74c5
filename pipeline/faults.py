"""Crash injection for tests: die as if killed right after the K-th durable write step.

Every step that changes files on disk (each SQL write statement and COMMIT,
each fsync, truncate and rename) calls `step(what)`. In normal use this does
nothing. With `CBIR_CRASH_AFTER=K` in the environment the process exits with
`os._exit` right after step K, skipping every `finally` and `atexit`, which
is what a kill -9 leaves behind. `CBIR_CRASH_LOG=FILE` appends one line per
step ("K what"), so a test can count the steps of a job and then crash it
after each one in turn (the way SQLite tests itself).
"""

from __future__ import annotations

import os

from pipeline import specs

CRASH_AFTER = "CBIR_CRASH_AFTER"
CRASH_LOG = "CBIR_CRASH_LOG"
CRASH_EXIT = 77  # what an injected crash exits with, so a test can tell it from a failure

_count = 0


def step(what: str) -> None:
    """Mark one durable write step; crash after it when a test asks for that."""
    global _count
    target, log = os.environ.get(CRASH_AFTER), os.environ.get(CRASH_LOG)
    if not target and not log:
        return
    _count += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_count} {what}\n")
    # Checked (a whole number from 1) when the command started; here too for API callers.
    if target and _count == specs.env_int(CRASH_AFTER):
        os._exit(CRASH_EXIT)
