"""Start (or join) a Ray cluster, deploy the engine replicas, serve the routed app.

A local cluster listens on loopback only (node IP 127.0.0.1), without the dashboard or usage
reporting, with a small object store: requests and outputs are small, and the engines' memory
is what matters. Ray Serve's own HTTP proxy stays off: the ingress (routes, tokenization,
routing) runs in this process, under the same uvicorn server and graceful shutdown as a single
engine.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve
from ray.serve.api import RunTarget

from paged_engine import EngineConfig

from ..server import run_server
from ..state import ServerSettings
from .app import build_routed_app
from .replica import deployment
from .routed_engine import RoutedEngine
from .router import RoutingPolicy

__all__ = [
    "OBJECT_STORE_BYTES",
    "deploy_replicas",
    "remove_replicas",
    "serve_replicas",
    "start_ray",
]

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 128 * 1024 * 1024
STARTUP_ATTEMPTS = 3
APP_PREFIX = "llm-serve-engine-"


def start_ray(address: str | None = None) -> bool:
    """Join the cluster at ``address``, or start a local one on loopback; returns whether this
    call started a local cluster (so the caller shuts it down). Does nothing if Ray is already
    up. A local start is retried when Ray's node misses its startup deadline."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                log_to_driver=True,
            )
            return True
        except Exception as exc:
            # Ray gives its local node a fixed 30 s to come up; a busy machine can miss that.
            if "timed out during startup" not in str(exc) or attempt == STARTUP_ATTEMPTS:
                raise
            logger.warning("the local Ray node did not start in time; retrying (%s)", exc)
            ray.shutdown()
    raise AssertionError("unreachable")


def deploy_replicas(config: EngineConfig, num_replicas: int) -> dict[str, Any]:
    """Deploy ``num_replicas`` engine replicas (one Ray Serve application each, ``engine-i``,
    all at once) and return their handles by name. Every replica gets ``config``."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    serve.start(proxy_location="Disabled")
    names = [f"engine-{i}" for i in range(num_replicas)]
    targets = [
        RunTarget(deployment(name, config), name=APP_PREFIX + name, route_prefix=None)
        for name in names
    ]
    handles = serve.run_many(targets)
    return dict(zip(names, handles, strict=True))


def remove_replicas(names: list[str]) -> None:
    """Delete the replicas' applications (Ray Serve lets running requests finish first)."""
    for name in names:
        try:
            serve.delete(APP_PREFIX + name)
        except Exception:
            logger.exception("removing engine replica %s failed", name)


def serve_replicas(
    config: EngineConfig,
    settings: ServerSettings,
    num_replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    ray_address: str | None = None,
    policy: RoutingPolicy | None = None,
) -> int:
    """Serve ``num_replicas`` engines behind one endpoint until SIGINT / SIGTERM, then drain
    (in-flight requests get ``settings.shutdown_timeout``) and stop the local Ray cluster this
    call started, or remove the replicas from the cluster it joined. Returns the exit status."""
    started = start_ray(ray_address)
    names: list[str] = []
    try:
        logger.info("starting %d engine replicas of %s", num_replicas, config.model)
        handles = deploy_replicas(config, num_replicas)
        names = list(handles)
        engine = RoutedEngine(handles, policy, max_queue=settings.max_queue)
        app = build_routed_app(engine, settings)
        return run_server(app, host=host, port=port, log_level=log_level)
    finally:
        # The server has drained: no request is left on any replica.
        if started:
            ray.shutdown()  # the whole local cluster, replicas included
        else:
            remove_replicas(names)
