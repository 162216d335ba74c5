"""`cbir duplicates --move-to DIR / --undo LOG / --plan FILE / --apply FILE`: acting on the
groups without deleting anything.

Apart from `duplicates` (which prints the groups) because this is the part of the command
that writes: its options, their combinations, and what it prints. The job, the log and
the plan format: pipeline/ingest/moves.py (reached through `api.move_duplicates`,
`api.undo_moves` and `api.write_move_plan`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from pipeline import api
from pipeline.cli.options import WritablePath
from pipeline.errors import CbirError

_KEYS = ("move_to", "log", "apply", "plan", "undo")

_OPTIONS = (
    click.option(
        "--move-to",
        "move_to",
        type=WritablePath(folder=True),
        default=None,
        metavar="DIR",
        help="Move every image of each group but its keeper into DIR, keeping their paths "
        "relative to the collection's folder (nothing is deleted); the catalog drops their "
        "rows, and a log lets --undo put everything back. Rerun after an interruption to "
        "finish.",
    ),
    click.option(
        "--log",
        "log",
        type=WritablePath(folder=False),
        default=None,
        metavar="FILE",
        help="With --move-to: where the log goes [default: DIR/cbir-duplicates-DATE-TIME.json].",
    ),
    click.option(
        "--undo",
        "undo",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="LOG",
        help="Put the images a --move-to moved back, byte for byte, with their catalog rows.",
    ),
    click.option(
        "--plan",
        "plan",
        type=WritablePath(folder=False),
        default=None,
        metavar="FILE",
        help="Write the moves --move-to would make as CSV (the --csv columns, a row per image "
        "to move), moving nothing.",
    ),
    click.option(
        "--apply",
        "apply",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="FILE",
        help="With --move-to: move the images a plan CSV lists (from --plan, or exported by "
        "the review page of 'cbir serve').",
    ),
)


def move_options(f):
    """The options of acting on the groups, declared on `cbir duplicates`."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def _mb(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def act(as_json: bool, as_csv: bool, options: dict[str, Any], **bar: Any) -> bool:
    """Carry out --move-to, --undo or --plan when one is given (their options are taken out
    of `options` either way); False when none is. `bar`: progress, on_total."""
    values = {k: options.pop(k, None) for k in _KEYS}
    move_to, log, apply, plan, undo = values.values()
    given = [f"--{k.replace('_', '-')}" for k, v in values.items() if v]
    if not (move_to or plan or undo):
        if given:
            raise CbirError(f"{given[0]} goes with --move-to DIR")
        return False
    if as_csv:
        raise CbirError(f"--csv lists groups; leave it out with {given[0]}")
    if undo and len(given) > 1:
        raise CbirError("--undo LOG goes alone (with --catalog), not with --move-to or --plan")
    if plan and len(given) > 1:
        raise CbirError("--plan FILE moves nothing: give it alone, then --move-to DIR --apply FILE")
    if undo:
        result = api.undo_moves(undo, **options)
    elif plan:
        result = api.write_move_plan(plan, **options, **bar)
    else:
        result = api.move_duplicates(move_to, apply=apply, log=log, **options, **bar)
    if as_json:
        click.echo(json.dumps(result))
    else:
        _say(result)
    return True


def _say(r: dict[str, Any]) -> None:
    if "plan" in r:
        click.echo(
            f"wrote {r['moves']} moves ({r['groups']} groups) to {r['plan']}; carry them out "
            f"with 'cbir duplicates --move-to DIR --apply {r['plan']}'"
        )
        return
    for path in r.get("finished", ()):
        click.echo(f"finished the interrupted move of {path}")
    if r.get("undone"):
        click.echo(f"nothing to undo: {r['log']} was undone at {r['undone']}")
        return
    if r["action"] == "undo":
        click.echo(
            f"put back {r['moved']} images ({_mb(r['bytes'])}) from {r['folder']}, "
            f"{r['rows']} catalog rows restored"
        )
        click.echo(f"log: {r['log']} (undone)")
        return
    if not r["moved"]:
        click.echo("nothing to move")
        return
    click.echo(
        f"moved {r['moved']} images ({_mb(r['bytes'])}) of {r['groups']} groups into "
        f"{r['folder']}; {r['rows']} catalog rows out; undo: cbir duplicates --undo {r['log']}"
    )
    click.echo(f"log: {r['log']}")
    sys.stdout.flush()
