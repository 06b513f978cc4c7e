"""API keys with two scopes, and per-key rate limits.

- `search`: search, batch, documents, answer, chat, rerank, embeddings, collections, basic info.
- `admin`: everything `search` may do, plus reload, `/metrics` and `/v1/info` in detail (paths, hosts).

Keys come from `server.api_keys` (search), `server.admin_keys` (admin) and `server.api_key_file` (one
`search KEY` or `admin KEY` per line, `#` comments). Clients send `Authorization: Bearer KEY` (the openai and
cohere clients do). Keys are compared in constant time against every configured key. With no key configured
the server is anonymous (every scope), which `sift serve` allows only on a loopback address unless
`server.allow_anonymous` is set. Probes (`/healthz`, `/readyz`), the playground page and the API docs need no
key.

Rate limits are a token bucket per key (per client address when anonymous): `server.rate_limit_per_s`
requests per second with bursts of `server.rate_limit_burst`; over it, 429 with `Retry-After`. Buckets live
in this process: each replica limits on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request

from app.api.errors import ApiError
from app.settings import ServerSettings

ScopeName = Literal["search", "admin"]
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's fingerprint (never the key) or `anonymous`, and its scopes."""

    name: str
    scopes: frozenset[str]
    verified: bool = False  # True when a key was checked (anonymous callers are never shown server details)

    def may(self, scope: ScopeName) -> bool:
        return scope in self.scopes


ANONYMOUS_SCOPES = frozenset({"search", "admin"})


def read_key_file(path: Path) -> list[tuple[str, str]]:
    """(scope, key) pairs from a key file: `search KEY` or `admin KEY` per line; `#` starts a comment."""
    pairs = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("search", "admin"):
            raise ValueError(f"{path}:{n}: expected `search KEY` or `admin KEY`")
        pairs.append((parts[0], parts[1]))
    return pairs


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """Token buckets by principal name; thread-safe."""

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s, self.burst = per_s, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, name: str) -> float:
        """0 when a request may go ahead now, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.per_s


class Auth:
    """Checks each request's key and scope, and its rate. Built once per app from `server` settings."""

    def __init__(self, settings: ServerSettings) -> None:
        pairs = [("search", k) for k in settings.api_keys] + [("admin", k) for k in settings.admin_keys]
        if settings.api_key_file is not None:
            pairs += read_key_file(settings.api_key_file)
        self._keys: list[tuple[bytes, Principal]] = []
        for scope, key in pairs:
            if len(key) < 16:
                raise ValueError(
                    f"an API key of the {scope} scope is shorter than 16 characters; use a long random key"
                )
            scopes = frozenset({"search", "admin"}) if scope == "admin" else frozenset({"search"})
            fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
            self._keys.append((key.encode(), Principal(f"key:{fingerprint}", scopes, verified=True)))
        self.anonymous = not self._keys
        self.limiter = (
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst) if settings.rate_limit_per_s else None
        )

    def identify(self, request: Request) -> Principal | None:
        """The caller's principal, or None when a key is needed and the one sent (if any) is unknown."""
        if self.anonymous:
            client = request.client.host if request.client else "unknown"
            return Principal(f"anonymous:{client}", ANONYMOUS_SCOPES)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        offered = token.strip().encode()
        found = None
        for key, principal in self._keys:  # every key is compared, so timing tells nothing about which matched
            if hmac.compare_digest(offered, key):
                found = principal
        return found

    def authorize(self, request: Request, scope: ScopeName) -> Principal:
        principal = self.identify(request)
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                "missing or unknown API key: send `Authorization: Bearer <key>` with a key from server.api_keys",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.may(scope):
            raise ApiError(403, "forbidden", f"this API key lacks the {scope} scope (server.admin_keys)")
        if self.limiter is not None:
            wait = self.limiter.take(principal.name)
            if wait > 0:
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit of {self.limiter.per_s:g} requests/s (burst {self.limiter.burst}) reached for "
                    f"this key; retry after {math.ceil(wait)} s",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        request.state.principal = principal
        return principal


def require(scope: ScopeName) -> Callable[[Request], Awaitable[Principal]]:  # a FastAPI dependency
    """Dependency: the request's key must carry `scope` (and be within its rate)."""

    async def check(request: Request) -> Principal:
        return request.app.state.auth.authorize(request, scope)

    return check


def principal_of(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)
