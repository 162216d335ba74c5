"""Connecting to Ray: the one place cbir starts or joins a cluster.

Ray is an optional extra (`pip install -e '.[ray]'`). Without an address a
local Ray instance is started for the job and stopped after it; `auto` joins
the cluster that `ray start` runs on this machine; `HOST:PORT` joins a remote
head. Every node must see the images, the catalog's vector file and the index
folder at the same paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from pipeline.errors import CbirError

# How long the first contact with a cluster's head may take (a TCP connect to its GCS
# port): a head that answers at all answers in well under a second, even across a WAN.
CONNECT_SECONDS = 10.0

# Ray's own limits on joining a cluster, read from RAY_* variables when `ray` is imported
# (RayConfig and node.py): each attempt to reach the GCS waits 5 s, not 30, and is made
# once, not 20 times. Without them a head that accepts the TCP connection but does not
# answer (not a GCS, a wrong version) holds `ray.init` for minutes; with them ~18 s.
# Set only for joining a cluster, and only where the user has not set them.
_JOIN_LIMITS = {
    "RAY_py_gcs_connect_timeout_s": "5",
    "RAY_gcs_server_port_wait_time_s": "1",
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def logs_wanted() -> bool:
    """CBIR_RAY_LOGS: show Ray's own output (1/true/yes/on) or not (unset, 0/false/no/off)."""
    value = os.environ.get("CBIR_RAY_LOGS", "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise CbirError(f"CBIR_RAY_LOGS must be 1 or 0 (true/false, yes/no, on/off), got {value!r}")
    return value in _TRUE


def require() -> None:
    """A one-line error naming the extra to install when Ray is missing (found without
    importing it: `ray` is imported only to connect, after `connected` has set its limits)."""
    if importlib.util.find_spec("ray") is None:
        raise CbirError(
            "--engine ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')"
        )


def _import() -> Any:
    try:
        import ray
    except ImportError as e:
        raise CbirError(f"--engine ray needs Ray, which fails to import: {e}") from None
    return ray


def quiet() -> None:
    """Keep Ray's own chatter (progress, INFO lines, deprecations) off cbir's terminal.

    Errors still show; CBIR_RAY_LOGS=1 shows everything, workers' logs included.
    """
    if logs_wanted():
        return
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Rr]ay.*")


def _head(ray: Any, address: str | None) -> tuple[str, int] | None:
    """(host, port) of the head `ray.init(address)` would join; None if it starts a local Ray.

    Ray's own resolution: "auto" and no address read RAY_ADDRESS or the address of the
    last `ray start` here, and a loopback host becomes this node's address.
    """
    where = address or "RAY_ADDRESS or the last 'ray start' here"
    if address and "://" in address:  # a Ray Client address, ray://HOST:PORT
        hostport: str | None = address.split("://", 1)[1].rstrip("/")
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # not in this version of Ray: its own limits apply
            return None
        try:
            hostport = canonicalize_bootstrap_address(address)
        except ConnectionError:  # "auto", and no cluster found
            raise CbirError(
                f"no Ray cluster for --ray-address {where}: none runs on this machine "
                "('ray start --head' starts one) and RAY_ADDRESS is not set; or give HOST:PORT"
            ) from None
        except (ValueError, OSError) as e:
            raise CbirError(f"cannot find the Ray cluster at {where}: {_first_line(e)}") from None
    if not hostport:
        return None
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CbirError(f"--ray-address must be 'auto' or HOST:PORT, got {hostport!r}")
    return host.strip("[]"), int(port)


def _probe(host: str, port: int, address: str | None) -> None:
    """Refuse in one line, within CONNECT_SECONDS, a head that cannot be reached at all."""
    where = address or f"{host}:{port} (from RAY_ADDRESS or the last 'ray start' here)"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            pass
    except TimeoutError:
        reason = f"no answer within {CONNECT_SECONDS:g} s"
    except ConnectionRefusedError:
        reason = f"nothing listens on port {port} of {host}"
    except OSError as e:  # unknown host, no route, ...
        reason = e.strerror or str(e) or type(e).__name__
    else:
        return
    raise CbirError(
        f"cannot reach the Ray cluster at {where}: {reason}; check the address, and that "
        "'ray start --head' runs there"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _stderr_kept_quiet() -> Iterator[None]:
    """Ray's core (C++) writes its connection warnings to file descriptor 2 itself, several
    lines each: while joining, fd 2 goes to a scratch file (CBIR_RAY_LOGS=1 keeps it)."""
    if logs_wanted():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def joins(address: str | None) -> bool:
    """Whether `connected(address)` joins a running cluster rather than starting a local one."""
    return bool(address and address != "local") or bool(os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def connected(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster; disconnect (and stop a local one) after.

    An already initialised Ray (a test's cluster, a notebook) is used as it is
    and left running. Joining a cluster is bounded: a head that cannot be reached
    is refused within CONNECT_SECONDS, one that does not answer as a Ray head
    within about 20 s (Ray's limits, `_JOIN_LIMITS`), in one line (exit 2).
    """
    require()
    if joins(address) and "ray" not in sys.modules:
        for name, value in _JOIN_LIMITS.items():
            os.environ.setdefault(name, value)
    ray = _import()
    if ray.is_initialized():
        yield ray
        return
    quiet()
    head = _head(ray, address) if address != "local" else None
    if head is not None:
        _probe(*head, address)
    # The driver's core worker logs (C++) at this level; its warning about actor
    # arguments in the object store is for ray.put objects cbir never frees early.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "log_to_driver": logs_wanted(),
        "configure_logging": True,
    }
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        with _stderr_kept_quiet() if head is not None else contextlib.nullcontext():
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        if head is None and not joins(address):  # starting a local Ray: not an address's fault
            raise CbirError(f"cannot start a local Ray instance: {_first_line(e)}", 1) from None
        where = address or (f"{head[0]}:{head[1]}" if head else "RAY_ADDRESS")
        raise CbirError(
            f"cannot join the Ray cluster at {where}: {_first_line(e)}; is a Ray "
            f"{ray.__version__} head running there?"
        ) from None
    try:
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
