"""`watch`: keep a catalog up to date with its folders, batch by batch, until stopped.

Each batch is the normal indexing job (`indexing.index`, with prune) over all the roots,
so there is one writer and one write protocol: new and changed files are embedded,
moved and renamed ones keep their ids and vectors (`ingest.renames`, no model run),
files gone from disk are pruned. Batches start on file events (`ingest.watch.Changes`,
debounced), at start (what changed while no watcher ran: a watcher killed with -9 and
started again catches up here), and every `rescan` seconds (events that were missed:
a network filesystem, a full event queue, a manifest's files elsewhere). The model is
loaded once (`models.cached_embedder`) and kept for the life of the watcher. While
another cbir job holds the catalog's write lock, the batch waits and tries again. `stop`
(an Event: the CLI sets it on Ctrl-C or SIGTERM) ends the loop between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import specs
from pipeline.api.indexing import index
from pipeline.api.models import embedder_for, open_collection, settings_for, with_descriptor
from pipeline.errors import CbirError, WriterBusy
from pipeline.ingest.jobs import Summary
from pipeline.ingest.watch import Changes

log = logging.getLogger("cbir")

DEBOUNCE = 1.0  # seconds of quiet after the last event before a batch
MAX_WAIT = 30.0  # at most this long after the first event of a batch
RESCAN = 600.0  # a full rescan this often even without events
BUSY_RETRY = 2.0  # seconds between tries while another job writes


@dataclass(frozen=True)
class Batch:
    """One batch of a watcher: why it ran, what the job did, how long it took."""

    reason: str  # "start", "events" or "rescan"
    events: int
    summary: Summary
    seconds: float


def watch(
    paths: list[str | Path],
    config: str | None = None,
    on_batch: Callable[[Batch], Any] | None = None,
    stop: threading.Event | None = None,
    debounce: float = DEBOUNCE,
    max_wait: float = MAX_WAIT,
    rescan: float = RESCAN,
    on_busy: Callable[[str], Any] | None = None,
    **options: Any,
) -> int:
    """Index `paths` (or the config's roots) now and again at every change until `stop` is
    set; returns the number of batches run. `options` are `index`'s (prune is always on).
    `on_batch(Batch)` hears each batch; `on_busy(line)` each wait for another writer."""
    debounce = specs.check("debounce", debounce, spec=specs.OPTIONS["debounce"])
    max_wait = specs.check("max_wait", max_wait, spec=specs.OPTIONS["max_wait"])
    rescan = specs.check("rescan", rescan, spec=specs.OPTIONS["rescan"])
    options = {**options, "prune": True}
    s = settings_for(config, **options)  # every option checked before anything is watched
    roots = [str(p) for p in (list(paths) or list(s.roots))]
    if not roots:
        raise CbirError("give at least one folder, image or manifest CSV (or 'roots' in a config)")
    stop = stop or threading.Event()
    batches = 0

    def run(reason: str, events: int = 0) -> None:
        nonlocal batches
        started = time.monotonic()
        summary = _index_when_free(roots, config, options, stop, on_busy)
        if summary is not None:
            batches += 1
            if on_batch:
                on_batch(Batch(reason, events, summary, time.monotonic() - started))

    with Changes(roots) as changes:  # watching before the first scan: nothing falls between
        run("start")
        _preload(config, options)
        next_rescan = time.monotonic() + rescan if rescan else None
        while not stop.is_set():
            timeout = None if next_rescan is None else max(0.0, next_rescan - time.monotonic())
            events = changes.wait(debounce, max_wait, timeout, stop)
            if stop.is_set():
                break
            if events or (next_rescan is not None and time.monotonic() >= next_rescan):
                run("events" if events else "rescan", events)
                if rescan:
                    next_rescan = time.monotonic() + rescan
    return batches


def _index_when_free(
    roots: list[str],
    config: str | None,
    options: dict[str, Any],
    stop: threading.Event,
    on_busy: Callable[[str], Any] | None,
) -> Summary | None:
    """One indexing job over the roots, tried again while another job holds the write lock;
    None if stopped while waiting."""
    told = False
    while True:
        try:
            return index(roots, config, **options)
        except WriterBusy as e:
            if on_busy and not told:  # once per wait, not at every try
                on_busy(str(e))
                told = True
            if stop.wait(BUSY_RETRY):
                return None


def _preload(config: str | None, options: dict[str, Any]) -> None:
    """Load the catalog's model now, so the first new file is not the one that waits for
    it (a catalog with no model yet loads it with its first images)."""
    s = settings_for(config, **options)
    try:
        coll = open_collection(s)
    except CbirError:
        return  # no catalog yet (nothing found at start): the first batch creates it
    try:
        if coll.fingerprint:
            embedder_for(with_descriptor(s, coll), coll)
    except CbirError as e:  # only a head start: the first batch that needs it says why
        log.warning("the model was not loaded ahead of the first new file: %s", e)
    finally:
        coll.close()
