"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint, each prompt
routed to the replica whose prefix cache holds most of it (see ``router``).

Needs the optional extra ``llm-serve[ray]``; nothing outside this package imports Ray, and
``require_ray`` turns a missing install into a message that says what to install.
"""

from __future__ import annotations

import os

__all__ = ["INSTALL_HINT", "RAY_ENV_DEFAULTS", "require_ray"]

# Read by Ray when it is first imported, so set here, before any module of this package imports
# it (an explicit setting in the environment wins). Under `uv run`, Ray would otherwise build a
# fresh virtual environment for every worker process; the replicas run in this environment, as
# installed. No usage reporting.
RAY_ENV_DEFAULTS = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
for _name, _value in RAY_ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

INSTALL_HINT = (
    "multi-replica serving needs Ray Serve: pip install 'llm-serve[ray]' (or, in this "
    "repository's workspace, uv sync --all-packages, whose dev group includes it)"
)


def require_ray() -> None:
    """Raise ``ImportError`` with ``INSTALL_HINT`` unless ``ray.serve`` can be imported."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
