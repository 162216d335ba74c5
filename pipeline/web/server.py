"""`cbir serve`: the web app (pipeline/web) on waitress, a production WSGI server.

The collection is opened and the model loaded once (a batch of 1), warmed
up, then shared by `threads` worker threads. Bound to anything but a
loopback address, the server requires a token unless told `--no-auth`; it moves
files (the review page of duplicates) only with `--allow-moves DIR`, and adds and
removes images (`POST /api/images`, `DELETE /api/images/ID`) only with `--uploads DIR`,
each with a token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask

from pipeline.api.session import open_session
from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.web import create_app
from pipeline.web.auth import is_loopback

DEFAULT_THREADS = 8


def required_token(
    host: str, token: str | None, no_auth: bool, allow_moves: bool = False, uploads: bool = False
) -> str | None:
    """The token requests must carry, or None; refuses to expose a collection unguarded,
    and to move files (`--allow-moves`) or add and remove images (`--uploads`) for anyone
    without one: on a loopback address with no token, any page in a browser on this
    machine could post to the server."""
    if token is not None and (not token or any(c.isspace() or not c.isprintable() for c in token)):
        raise CbirError("the token must be printable text without spaces (--token or CBIR_TOKEN)")
    if token and no_auth:
        raise CbirError("give a token (--token or CBIR_TOKEN) or --no-auth, not both")
    if not token and not no_auth and not is_loopback(host):
        raise CbirError(
            f"--host {host} serves other machines: give --token TOKEN (or set CBIR_TOKEN), "
            "or --no-auth to serve without one"
        )
    if allow_moves and not token:
        raise CbirError(
            "--allow-moves needs a token (--token or CBIR_TOKEN): only requests carrying it "
            "may move files"
        )
    if uploads and not token:
        raise CbirError(
            "--uploads needs a token (--token or CBIR_TOKEN): only requests carrying it "
            "may add or remove images, on any address"
        )
    return token or None


# Concurrent uploads are embedded together, up to this many per forward pass.
MICRO_BATCH = 8


def open_app(settings: Settings, **options: Any) -> Flask:
    """The app over the settings' collection, its model loaded once (micro-batches of uploads).

    Relative paths (the default `catalog.db`, `index`) are resolved here, once, against the
    working directory at start-up (the thumbnail folder too, in `Service`): no request then
    depends on it, or on Flask's idea of it.
    """
    settings = settings.replace(
        catalog=os.path.abspath(settings.catalog), index_dir=os.path.abspath(settings.index_dir)
    )
    return create_app(open_session(settings, batch_size=MICRO_BATCH), settings, **options)


def make_server(app: Flask, host: str, port: int, threads: int = DEFAULT_THREADS):
    """A waitress server bound now (port 0: any free port), not yet serving."""
    from waitress.server import create_server

    max_upload = int(app.config["MAX_CONTENT_LENGTH"])
    # "Task queue depth is N" would be a line per request whenever clients outnumber threads.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="cbir",
        # Waitress buffers a whole body (on disk past 512 KB) before the app runs. Up
        # to this size the app answers a too-large upload (413, one line of JSON);
        # past it waitress refuses it itself, so no client fills the disk.
        max_request_body_size=2 * max_upload + (1 << 20),
        clear_untrusted_proxy_headers=True,
    )


def urls(server) -> list[str]:
    """http://HOST:PORT/ of each socket the server listens on."""
    listening = getattr(server, "effective_listen", None) or [
        (server.effective_host, server.effective_port)
    ]
    return [f"http://{f'[{h}]' if ':' in str(h) else h}:{p}/" for h, p in listening]


def run(server) -> None:
    """Serve until interrupted."""
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@contextmanager
def running(app: Flask, threads: int = DEFAULT_THREADS) -> Iterator[str]:
    """Serve `app` on 127.0.0.1, any free port, in a thread; yields its URL."""
    from waitress import wasyncore

    server = make_server(app, "127.0.0.1", 0, threads)
    thread = threading.Thread(target=server.run, daemon=True, name="waitress")
    thread.start()
    try:
        yield urls(server)[0].rstrip("/")
    finally:
        # Closed from the loop's own thread: closing its sockets from this one races its
        # select() (EBADF). With its map empty, the loop returns.
        # OSError: the loop has closed its sockets, the trigger included, already.
        with contextlib.suppress(OSError):
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(timeout=10)
        server.task_dispatcher.shutdown()
