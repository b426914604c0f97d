"""Per-tenant usage counters: what an ordinary API key may see of the server's work.

Engine-wide figures (KV blocks, every tenant's prefix-cache hits and tokens) would tell one
tenant about the others' traffic, so with API keys only the admin key reads them. Every other
key gets these counters, kept from its own finished requests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from paged_engine import RequestOutput

__all__ = ["TenantCounters", "TenantUsage"]


@dataclass
class TenantCounters:
    """One tenant's finished requests and their tokens. Prefix-cache tokens count as the
    engine counts them: once per request, at its first admission."""

    num_requests: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dataclasses.asdict(self)
        out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out


class TenantUsage:
    """Counters by tenant (bytes; ``b""`` for a server without keys). Feed it with
    ``observe(tenant, output)`` for every request's final output (an ``AsyncEngine`` usage
    hook); the number of tenants is bounded by the configured keys."""

    def __init__(self) -> None:
        self._by_tenant: dict[bytes, TenantCounters] = {}

    def observe(self, tenant: bytes, out: RequestOutput) -> None:
        c = self._by_tenant.setdefault(tenant, TenantCounters())
        c.num_requests += 1
        c.generation_tokens_total += len(out.token_ids)
        if out.first_scheduled_time is not None:  # it reached the engine's cache lookup
            c.prompt_tokens_total += len(out.prompt_token_ids)
            c.prefix_cache_queried_tokens += len(out.prompt_token_ids)
            c.prefix_cache_hit_tokens += out.num_cached_tokens

    def of(self, tenant: bytes) -> TenantCounters:
        """A copy of ``tenant``'s counters (zeros if it has sent nothing)."""
        return dataclasses.replace(self._by_tenant.get(tenant, TenantCounters()))
