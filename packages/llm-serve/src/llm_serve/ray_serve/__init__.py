"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint, each prompt
routed to the replica whose prefix cache holds most of it (see ``router``).

Needs the optional extra ``llm-serve[ray]``; nothing outside this package imports Ray, and
``require_ray`` turns a missing install into a message that says what to install.
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "require_ray"]

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
