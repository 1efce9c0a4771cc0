"""Connecting to Ray: a private single-machine cluster, or an existing one.

``--ray-address`` takes one of:

- ``local`` (the default): start a cluster inside this process, its servers bound to
  127.0.0.1 only, stopped when the search ends;
- ``auto``: the cluster already running on this machine (``ray start`` was run here);
- ``HOST:PORT``: the GCS address of a cluster's head node (port 6379 by default);
- ``ray://HOST:PORT``: a Ray Client server (port 10001 by default).

An address that does not respond gives one :class:`~rl_pruner.errors.ConfigError`
within :data:`CONNECT_TIMEOUT_S` seconds, before Ray's own connection retries (which
last minutes) start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rl_pruner.errors import ConfigError

logger = logging.getLogger(__name__)

LOCAL = "local"
AUTO = "auto"
CONNECT_TIMEOUT_S = 20.0
_PROBE_TIMEOUT_S = 5.0
_FIX = "start the cluster with 'ray start --head', or pass --ray-address local to run on this machine only"

# Ray reads this switch once, when it is imported. When it is off, Ray takes
# 127.0.0.1 as the node address, and its servers then listen on the loopback
# interface only.
_MULTI_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def threads_per_worker(n_workers: int, requested: int | None = None, n_cpus: int | None = None) -> int:
    """Torch threads for each of ``n_workers`` workers on one machine of ``n_cpus`` cores.

    ``requested`` wins when given (>= 1). Otherwise the cores are shared evenly, at
    least one thread each, so N workers do not oversubscribe the machine.
    """
    if requested is not None:
        return requested
    cpus = n_cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, n_workers))


@contextmanager
def ray_cluster(address: str, *, n_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Connect to (or start) the Ray cluster at ``address`` and disconnect afterwards.

    Yields a summary: the address, whether the cluster is private to this process,
    and its CPU count. ``n_cpus`` sets the CPUs of a ``local`` cluster (default: all
    cores of this machine); it is ignored for an existing cluster.
    """
    check_ray_address(address)
    if address == LOCAL:
        _keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        # A caller (a test, a notebook) connected already; leave the connection to it.
        yield _summary(ray, address)
        return

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == LOCAL:
        kwargs["num_cpus"] = n_cpus or os.cpu_count() or 1
    # Ray's own "local" always starts a new cluster, even where 'ray start' runs one.
    _init_with_timeout(ray, address, kwargs, address)
    try:
        yield _summary(ray, address)
    finally:
        ray.shutdown()


def _summary(ray: Any, address: str) -> dict[str, Any]:
    resources = ray.cluster_resources()
    return {"address": address, "private": address == LOCAL, "n_cpus": int(resources.get("CPU", 0)),
            "n_nodes": len([node for node in ray.nodes() if node.get("Alive")])}


def _keep_ray_on_loopback() -> None:
    if "ray" not in sys.modules:
        os.environ.setdefault(_MULTI_NODE_SWITCH, "0")
        return
    # Ray was imported before the switch could be set (a test imported it first).
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        logger.warning("ray was imported before rl-pruner could keep its local cluster on 127.0.0.1; "
                       "its servers may listen on every interface")


def _auto_address() -> str:
    """Resolve ``auto`` to ``$RAY_ADDRESS``, else to the cluster that the last
    ``ray start`` on this machine recorded in Ray's temporary folder."""
    from_environment = os.environ.get("RAY_ADDRESS", "").strip()
    if from_environment and from_environment != AUTO:
        return from_environment
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        recorded = record.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise ConfigError(
            f"--ray-address auto found no Ray cluster on this machine (no RAY_ADDRESS and no {record}); {_FIX}"
        )
    return recorded


def check_ray_address(address: str) -> None:
    """Reject an address that is malformed or does not accept TCP connections.

    ``auto`` is resolved first, as Ray resolves it, so a cluster that stopped without
    'ray stop' is reported here instead of in Ray's minutes of retries.
    NOTE: Ray also falls back to any running cluster it finds among the processes;
    that fallback is not checked here.
    """
    if address == LOCAL:
        return
    if address == AUTO:
        resolved = _auto_address()
        try:
            check_ray_address(resolved)
        except ConfigError as err:
            raise ConfigError(f"--ray-address auto means {resolved} here, and {err}") from err
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if parts.scheme not in ("gcs", "ray"):
        raise ConfigError(
            f"Ray address {address!r} has an unknown scheme {parts.scheme!r}; use local, auto, HOST:PORT or "
            "ray://HOST:PORT in --ray-address"
        )
    try:
        port = parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError as err:
        raise ConfigError(f"Ray address {address!r} has an invalid port; use HOST:PORT in --ray-address") from err
    if not parts.hostname:
        raise ConfigError(f"Ray address {address!r} names no host; use HOST:PORT in --ray-address")
    try:
        with socket.create_connection((parts.hostname, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(f"Ray cluster at {address} is not reachable ({err.strerror or err}); {_FIX}") from err


def _init_with_timeout(ray: Any, init_address: str, kwargs: dict[str, Any], address: str) -> None:
    """Run ``ray.init``. An existing cluster that accepts TCP but never responds (a wrong
    port, a token mismatch) fails within CONNECT_TIMEOUT_S.

    ``ray.init`` must run in the main thread: the processes of a local cluster are
    tied to the thread that starts them and die when it ends. The timeout therefore
    uses SIGALRM, which exists only in the main thread (elsewhere there is none).
    """
    use_alarm = address != LOCAL and threading.current_thread() is threading.main_thread() \
        and hasattr(signal, "SIGALRM")

    def give_up(signum: int, frame: Any) -> None:
        raise TimeoutError(f"timed out after {CONNECT_TIMEOUT_S:g} s")

    previous = signal.signal(signal.SIGALRM, give_up) if use_alarm else None
    if use_alarm:
        signal.alarm(int(CONNECT_TIMEOUT_S))
    try:
        ray.init(address=init_address, **kwargs)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if address == LOCAL:
            raise ConfigError(f"could not start a local Ray cluster ({reason}); check 'ray stop' and free memory") from err
        raise ConfigError(f"could not connect to the Ray cluster at {address} ({reason}); {_FIX}") from err
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    logger.info("connected to Ray at %s: %s", address, ray.cluster_resources())
