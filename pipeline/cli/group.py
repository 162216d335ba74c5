"""The `cbir` group: its own options (--version, --debug), the output streams and the
log handler every command shares, and the list of commands.

Named `group`, not `main`: `pipeline.cli.main` is the group itself (the console script).
"""

from __future__ import annotations

import logging
import sys

import click

from pipeline import errors
from pipeline.cli.benching import bench_group
from pipeline.cli.checking import info_cmd, verify_cmd
from pipeline.cli.duplicates import duplicates_cmd
from pipeline.cli.experiments import evaluate_cmd, train_cmd
from pipeline.cli.indexing import build_index_cmd, index_cmd
from pipeline.cli.options import OneLineGroup
from pipeline.cli.querying import search_cmd
from pipeline.cli.serving import serve_cmd
from pipeline.cli.watching import watch_cmd


@click.group("cbir", cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cbir")
@click.option(
    "--debug",
    is_flag=True,
    envvar="CBIR_DEBUG",
    help="Print the full traceback of an unexpected error [env CBIR_DEBUG].",
)
def main(debug: bool) -> None:
    """Content-based image retrieval: index a folder once, then search it by example."""
    errors.DEBUG = debug
    # File names that are not valid UTF-8 are printed as their original bytes (as
    # `ls` does), whatever the locale's error handler; never an encoding traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    # Notices (repairs, skipped work) go to stderr as one line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cbir: %(levelname)s: %(message)s"))
    logger = logging.getLogger("cbir")
    logger.handlers[:] = [handler]
    logger.propagate = False


# In this order, as `cbir --help` lists them.
for command in (
    index_cmd,
    watch_cmd,
    search_cmd,
    duplicates_cmd,
    build_index_cmd,
    info_cmd,
    verify_cmd,
    evaluate_cmd,
    train_cmd,
    serve_cmd,
    bench_group,
):
    main.add_command(command)
