"""Start-up checks of `chatstream gateway` and `chatstream up`, run before anything binds.

The sid cookie is signed with `--session-secret`; with the published default anyone can forge
a cookie for any session id. So a gateway bound to a non-loopback address refuses to start with
the default secret (exit code 2) unless `--allow-default-secret` says it is meant. Open
generation or admin endpoints on such an address are only warned about: they may sit behind a
proxy that authenticates.

Redis is asked once: a password it refuses (or one it wants and did not get) is a configuration
error, exit code 2 with a message that names the URL without its password. A Redis that does not
answer yet is only a warning: the gateway waits for it as usual.
"""

from __future__ import annotations

import logging
import sys

import redis
from redis.exceptions import AuthenticationError, RedisError

from chatstream_cluster.gateway.auth import is_loopback
from chatstream_cluster.gateway.chatstream.roles import ClientRoles
from chatstream_cluster.shared.redis_client import redact_url, tls_defaults
from chatstream_cluster.shared.settings import DEFAULT_SESSION_SECRET, GatewaySettings

log = logging.getLogger("chatstream.gateway")

EXIT_CONFIG_ERROR = 2


def startup_error(settings: GatewaySettings) -> str | None:
    """Why the gateway must not start with these settings, or None."""
    if any(not key.strip() for key in settings.api_keys):
        return "an --api-key is empty (an unset variable?); give every key a value"
    if settings.client_roles_file:
        try:
            ClientRoles.from_file(settings.client_roles_file)
        except ValueError as exc:
            return f"--client-roles-file: {exc}"
    if is_loopback(settings.host):
        return None
    if settings.session_secret == DEFAULT_SESSION_SECRET and not settings.allow_default_secret:
        return (
            f"refusing to bind {settings.host!r} with the default session secret: anyone could "
            "forge session cookies. Set --session-secret (or CHATSTREAM_SESSION_SECRET) to a "
            "long random value, e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))"
            "\"`, or pass --allow-default-secret if this is really meant."
        )
    return None



def redis_error(url: str, timeout: float = 2.0) -> str | None:
    """Why Redis at `url` can never work (a bad URL, refused credentials), or None.

    Unreachable is not fatal (Redis may start after the gateway): it is logged."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      **tls_defaults(url))
    except ValueError as exc:
        return f"invalid --redis-url {redact_url(url)!r}: {exc}"
    try:
        client.ping()
    except AuthenticationError as exc:
        return (
            f"Redis at {redact_url(url)} refused the credentials: {exc} Put the right password "
            "in --redis-url (CHATSTREAM_REDIS_URL): redis://:PASSWORD@host:6379/0, or "
            "redis://USER:PASSWORD@host:6379/0 for an ACL user; rediss:// for TLS."
        )
    except (RedisError, OSError) as exc:
        log.warning("redis not reachable at start-up; waiting for it",
                    extra={"redis": redact_url(url), "error": str(exc)})
    finally:
        client.close()
    return None


def startup_warnings(settings: GatewaySettings) -> list[str]:
    """What is open to the network with these settings (logged, not fatal)."""
    if is_loopback(settings.host):
        return []
    warnings = []
    if not settings.api_keys:
        warnings.append(
            f"no --api-key: anyone who reaches {settings.host}:{settings.port} can generate"
        )
    if not settings.admin_key:
        warnings.append("no --admin-key: /admin/* and /metrics answer loopback clients only")
    if settings.session_secret == DEFAULT_SESSION_SECRET:
        warnings.append("the default session secret is in use (--allow-default-secret)")
    return warnings


def check_startup(settings: GatewaySettings, *, warn: bool = True) -> None:
    """Exit with code 2 and a message on stderr when the settings are unsafe; log warnings."""
    error = startup_error(settings)
    if error is None and settings.redis_url:  # empty: `up` starts an embedded Redis
        error = redis_error(settings.redis_url)
    if error is not None:
        print(f"chatstream: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG_ERROR)
    for warning in startup_warnings(settings) if warn else []:
        log.warning(warning)
