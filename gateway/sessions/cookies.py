"""The signed `sid` cookie of a ChatStream session.

The cookie holds `<sid>.<hmac>`: a 128-bit random id and its HMAC-SHA256 under
`--session-secret`. A cookie that does not verify starts a fresh session, never an error.

With API keys, a session belongs to the key it was created with: the HMAC also covers the key's
id (`owner`), so the same cookie sent with another key does not verify there and that request
gets a fresh session of its own; the first key's session is never read or changed by it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from chatstream_cluster.shared.keys import safe_id

COOKIE_NAME = "sid"
SID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def new_sid() -> str:
    """A fresh session id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


class CookieSigner:
    """Signs session ids for the `sid` cookie and verifies them in constant time."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, sid: str, owner: str) -> str:
        # Without an owner (no API keys) the MAC is over the sid alone, as before keys existed.
        message = f"{owner}:{sid}" if owner else sid
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def sign(self, sid: str, owner: str = "") -> str:
        """The cookie value of `sid`, bound to `owner` (an API key id, or "" without keys)."""
        return f"{sid}.{self._mac(sid, owner)}"

    def verify(self, value: str | None, owner: str = "") -> str | None:
        """The session id of a genuine cookie value signed for `owner`; None for anything else."""
        if not value or len(value) > 128:
            return None
        sid, _, mac = value.partition(".")
        if not SID_PATTERN.match(sid):
            return None
        if not hmac.compare_digest(self._mac(sid, owner).encode(), mac.encode()):
            return None
        return safe_id(sid)


