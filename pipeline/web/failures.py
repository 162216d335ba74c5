"""HTTP status by kind of error, each with a one-line message.

400 bad input, 401 no token, 403 not allowed by this server, 404 unknown id, 409 stale
index, 413 too large (werkzeug's), 503 busy (decode slots, another writer) or not ready,
500 an integrity failure or a bug (whose traceback goes to the log, never to the client).
"""

from __future__ import annotations

import logging
import re
import sqlite3

from pipeline import errors
from pipeline.errors import (
    CatalogNotReady,
    CbirError,
    NotFoundError,
    StaleIndexError,
    WriterBusy,
)
from pipeline.web.slots import Busy

log = logging.getLogger("cbir")

CATALOG_BUSY = "the catalog is busy (a job is writing or upgrading it); retry in a moment"


class BadRequest(Exception):
    """A client error found by the web layer itself: HTTP 400."""


class Unauthorized(Exception):
    """No valid token: HTTP 401."""


class Forbidden(Exception):
    """Something this server was not started to do (moving files): HTTP 403."""


def status_and_message(e: Exception) -> tuple[int, str]:
    """HTTP status and one-line message for an error raised while serving."""
    if isinstance(e, BadRequest):
        return 400, str(e)
    if isinstance(e, Unauthorized):
        return 401, str(e)
    if isinstance(e, Forbidden):
        return 403, str(e)
    if isinstance(e, Busy):
        return 503, str(e)
    if isinstance(e, CatalogNotReady):  # before CbirError: it is one
        return 503, CATALOG_BUSY
    if isinstance(e, WriterBusy):  # another job writes (a CLI `cbir index`): retry later
        return 503, "another job is writing the catalog; retry when it is done"
    if isinstance(e, NotFoundError):
        return 404, str(e)
    if isinstance(e, StaleIndexError):
        return 409, str(e)
    if isinstance(e, CbirError) and e.exit_code != 1:
        return 400, str(e)
    if isinstance(e, sqlite3.OperationalError) and re.search(r"locked|busy", str(e)):
        return 503, CATALOG_BUSY
    # A failed integrity check, a full disk, a damaged catalog: the server's side, not the client's.
    known = str(e) if isinstance(e, CbirError) else errors.describe(e)
    if known:
        log.error("cbir serve: %s", known)
        return 500, known
    log.exception("cbir serve: unexpected error")  # a bug: the traceback goes to the log
    return 500, f"internal error ({type(e).__name__}); the server log has the details"
