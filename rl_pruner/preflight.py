"""Reachability checks of a search's servers, made before the slow imports of a search.

``rl-pruner search`` and ``sweep`` import torch, Stable-Baselines3, MLflow and Ray,
which takes ten seconds or more on a busy machine. The CLI first runs
:func:`check_endpoints`, which needs only the standard library, so that an
unreachable Ray cluster or tracking server is reported within seconds. The full
checks (:func:`rl_pruner.tracking.check_tracking_uri`, Ray's own connection) still
run later.
"""

from __future__ import annotations

import http.client
import socket
from urllib.parse import urlsplit

from rl_pruner.config import SearchConfig
from rl_pruner.distributed.cluster import check_ray_address
from rl_pruner.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


def check_endpoints(config: SearchConfig, *, uses_ray: bool) -> None:
    """Raise ConfigError when the tracking server, or with ``uses_ray`` the Ray cluster,
    refuses connections or does not respond within PROBE_TIMEOUT_S seconds."""
    if uses_ray:
        check_ray_address(config.distributed.ray_address)
    probe_tracking_server(config.tracking.uri)


def probe_tracking_server(uri: str) -> None:
    """Open a connection to an ``http(s)://`` tracking URI; other URIs are left to the full check.

    Only failures to connect are reported here. An HTTP error status (a proxy asking
    for credentials, say) is left to :func:`rl_pruner.tracking.check_tracking_uri`,
    which sends MLflow's own credentials.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, http.client.HTTPException) as err:
        redacted = uri if parts.password is None else uri.replace(parts.password, "***")
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ConfigError(
            f"tracking server at {redacted} is not reachable ({reason}); "
            "start it with 'mlflow server --host 127.0.0.1 --port PORT' or fix tracking.uri"
        ) from err
