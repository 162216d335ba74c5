"""Connecting to Ray: the one place cbir starts or joins a cluster.

Ray is an optional extra (`pip install -e '.[ray]'`). Without an address a
local Ray instance is started for the job and stopped after it; `auto` joins
the cluster that `ray start` runs on this machine; `HOST:PORT` joins a remote
head. Every node must see the images, the catalog's vector file and the index
folder at the same paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from pipeline.errors import CbirError


def require() -> Any:
    """The `ray` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise CbirError(
            "--engine ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


def quiet() -> None:
    """Keep Ray's own chatter (progress, INFO lines, deprecations) off cbir's terminal.

    Errors still show; CBIR_RAY_LOGS=1 shows everything, workers' logs included.
    """
    if os.environ.get("CBIR_RAY_LOGS"):
        return
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Rr]ay.*")


@contextlib.contextmanager
def connected(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster; disconnect (and stop a local one) after.

    An already initialised Ray (a test's cluster, a notebook) is used as it is
    and left running.
    """
    ray = require()
    if ray.is_initialized():
        yield ray
        return
    quiet()
    # The driver's core worker logs (C++) at this level; its warning about actor
    # arguments in the object store is for ray.put objects cbir never frees early.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": bool(os.environ.get("CBIR_RAY_LOGS")),
        "configure_logging": True,
    }
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CbirError(f"cannot connect to Ray at {where}: {first}", 1) from None
    try:
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
