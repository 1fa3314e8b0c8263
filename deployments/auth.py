"""Bearer tokens bound to tenants. The API never runs open: with no token configured, `serve`
generates one for tenant 'default' and prints it."""
from __future__ import annotations

import hmac
import secrets

from ray_faceid.errors import BadInput


def parse_tokens(spec: str) -> dict[str, str]:
    """'tenant:token,tenant:token' -> {tenant: token}."""
    tokens = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        tenant, sep, token = item.partition(":")
        if not sep or not tenant or len(token) < 16:
            raise BadInput(f"API token entry {item.split(':')[0]!r}: expected tenant:token with a token of >= 16 chars")
        tokens[tenant] = token
    return tokens


def generated_token() -> str:
    return secrets.token_urlsafe(24)


def tenant_for(authorization: str | None, tokens: dict[str, str]) -> str | None:
    """The tenant whose token is presented, comparing in constant time; None if none matches."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    presented = authorization[7:].strip()
    found = None
    for tenant, token in tokens.items():
        if hmac.compare_digest(presented.encode(), token.encode()):
            found = tenant
    return found
