"""`cbir watch`: keep a catalog up to date with its folders until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import click

from pipeline import api
from pipeline.cli.options import common_options, job_options, runtime_options, typed
from pipeline.specs import OPTIONS


@contextlib.contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `stop` (the batch under way finishes, then the watcher ends);
    a second Ctrl-C interrupts at once (the job is crash-safe: its next start repairs)."""

    def first(signum: int, frame: Any) -> None:
        click.echo("cbir watch: stopping after this batch (Ctrl-C again to stop now)", err=True)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread (an embedding caller's)
        return
    old = {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _line(batch: api.Batch) -> str:
    s = batch.summary
    plural = "" if batch.events == 1 else "s"
    why = f"{batch.events} event{plural}" if batch.reason == "events" else batch.reason
    return (
        f"{time.strftime('%H:%M:%S')} {why}: scanned {s.scanned}, "
        f"indexed {s.indexed + s.copied} (model {s.indexed}), moved {s.moved}, "
        f"pruned {s.pruned}, failed {s.failed}, unchanged {s.unchanged} "
        f"({batch.seconds:.2f} s)"
    )


def _print(batch: api.Batch) -> None:
    click.echo(_line(batch))
    for line in batch.summary.index_notes:
        click.echo(f"  {line}")
    for path, reason in batch.summary.failures[:20]:
        click.echo(f"  failed: {path}: {reason}", err=True)


@click.command("watch")
@click.argument("paths", nargs=-1, required=False)
@click.option(
    "--debounce",
    type=typed(OPTIONS["debounce"]),
    default=api.watching.DEBOUNCE,
    show_default=True,
    help="Seconds without file events before a batch is indexed.",
)
@click.option(
    "--max-wait",
    "max_wait",
    type=typed(OPTIONS["max_wait"]),
    default=api.watching.MAX_WAIT,
    show_default=True,
    help="Index a batch at most this many seconds after its first event, even if files "
    "keep changing.",
)
@click.option(
    "--rescan",
    type=typed(OPTIONS["rescan"]),
    default=api.watching.RESCAN,
    show_default=True,
    help="Seconds between full rescans that catch missed events (0: only at start).",
)
@click.option(
    "--labels",
    default=None,
    help="'folder' (parent folder name, default), 'none', or a CSV of path,label.",
)
@job_options
@click.option(
    "--update-indexes",
    "update_indexes",
    is_flag=True,
    default=None,
    help="After each batch, grow stale IVF indexes without retraining (as index does).",
)
@runtime_options
@common_options
def watch_cmd(
    paths: tuple[str, ...], debounce: float, max_wait: float, rescan: float, **options: Any
) -> None:
    """Keep the catalog up to date as files under PATHS appear, change, move and go.

    Indexes PATHS now (what changed while no watcher ran), then again after each burst of
    file events and every --rescan seconds, as 'cbir index --prune' does: moved and
    renamed files keep their ids and vectors. One line per batch; Ctrl-C or SIGTERM
    stops between batches.
    """
    stop = threading.Event()
    with _stopped_by_signals(stop):
        api.watch(
            list(paths),
            on_batch=_print,
            on_busy=lambda line: click.echo(f"cbir watch: {line}; retrying", err=True),
            stop=stop,
            debounce=debounce,
            max_wait=max_wait,
            rescan=rescan,
            **options,
        )
