"""`cbir serve`: the web page and JSON API over a collection, on waitress."""

from __future__ import annotations

import click

from pipeline import api
from pipeline.cli.options import (
    WritablePath,
    common_options,
    runtime_options,
    typed,
)
from pipeline.errors import CbirError
from pipeline.specs import OPTIONS, SPEC


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port", type=typed(OPTIONS["port"]), default=8000, show_default=True, help="0: any free port."
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Worker threads of the WSGI server (waitress).",
)
@click.option(
    "--token",
    envvar="CBIR_TOKEN",
    default=None,
    help="Require this token (Authorization: Bearer, or the login form) [env CBIR_TOKEN]; "
    "needed on any address but loopback.",
)
@click.option(
    "--no-auth",
    "no_auth",
    is_flag=True,
    help="Serve a non-loopback address without a token (anyone who can reach it can search).",
)
@click.option(
    "--thumbs-dir",
    "thumbs_dir",
    default=None,
    type=WritablePath(folder=True),
    help="Thumbnail cache [default: CATALOG with suffix .thumbs].",
)
@click.option(
    "--max-upload-mb",
    "max_upload_mb",
    type=typed(OPTIONS["max_upload_mb"]),
    default=20,
    show_default=True,
    help="Largest upload accepted, in MB.",
)
@click.option(
    "--max-pixels",
    "max_pixels",
    type=typed(SPEC["max_pixels"]),
    default=None,
    help="Refuse uploads with more pixels, in the file or once resized for the model "
    "(decompression bombs); and images thinner than 50:1.",
)
@click.option(
    "-k", type=typed(SPEC["k"]), default=None, help="Default number of results on a page."
)
@click.option("--index", default=None, help="Default index: 'exact' or a built one.")
@click.option("--rerank", default=None, help="Default re-ranking: 'dba', 'aqe' or 'dba+aqe'.")
@click.option(
    "--allow-moves",
    "allow_moves",
    default=None,
    metavar="DIR",
    type=WritablePath(folder=True),
    help="Let the review page of duplicates (/duplicates) move the images chosen there into "
    "DIR, as `cbir duplicates --move-to DIR` does; needs a token. Without it the server "
    "never moves a file.",
)
@click.option(
    "--uploads",
    "uploads",
    default=None,
    metavar="DIR",
    type=WritablePath(folder=True),
    help="Let clients add images (POST /api/images: stored in DIR under names made from "
    "their bytes, then indexed) and remove them (DELETE /api/images/ID: from the catalog, "
    "not the file); needs a token, on every address. See docs/http.md.",
)
@click.option(
    "--delete-files",
    "delete_files",
    is_flag=True,
    help="With --uploads: DELETE /api/images/ID also deletes the image's file when it lies "
    "inside the uploads DIR (never a file outside it).",
)
@runtime_options
@common_options
def serve_cmd(
    host: str,
    port: int,
    threads: int,
    token: str | None,
    no_auth: bool,
    thumbs_dir,
    max_upload_mb: float,
    allow_moves: str | None,
    uploads: str | None,
    delete_files: bool,
    **options,
) -> None:
    """A web page and JSON API over the catalog, on waitress (binds 127.0.0.1 by default).

    Pages and `POST /api/search` take k, index, rerank and relevance feedback
    (relevant / not_relevant ids); answers have the shape of `cbir search --json`.
    /duplicates reviews the groups of `cbir duplicates` (JSON: `GET /api/duplicates`)
    and exports the chosen moves as CSV. With --uploads, `POST /api/images` adds
    images and `DELETE /api/images/ID` removes them (docs/http.md).
    """
    from pipeline.web import server as serve

    if delete_files and uploads is None:
        raise CbirError("--delete-files needs --uploads DIR: only files there are deleted")
    # Before loading anything.
    token = serve.required_token(host, token, no_auth, allow_moves is not None, uploads is not None)
    app = serve.open_app(
        api.settings_for(**options),
        thumbs_dir=thumbs_dir,
        max_upload=int(max_upload_mb * 1024 * 1024),
        token=token,
        moves_to=allow_moves,
        uploads_to=uploads,
        delete_files=delete_files,
    )
    server = serve.make_server(app, host, port, threads)
    for url in serve.urls(server):
        click.echo(f"cbir: serving on {url} ({threads} threads)", err=True)
    if token is None and not serve.is_loopback(host):
        click.echo(
            "cbir: warning: no token (--no-auth): anyone who can reach it can search", err=True
        )
    serve.run(server)
