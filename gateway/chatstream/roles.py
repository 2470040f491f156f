"""ChatStream's `client_roles`: which ChatStream APIs a client may call, with ChatStream's format.

```python
client_roles = {
    "user":      {"apis": {"allow": ["chat_stream", "clear_context", "set_feedback"],
                           "auth_method": "nothing", "use_session": True}},     # browsers
    "developer": {"apis": {"allow": "all", "auth_method": "ui_pass_phrase",
                           "ui_pass_phrase": "open sesame", "use_session": True,
                           "enable_dev_tool": True}},
    "agent":     {"apis": {"allow": ["get_load"], "auth_method": "nothing",
                           "use_session": False}},                              # programs
    "ops":       {"apis": {"allow": "all", "auth_method": "header_phrase_sha256",
                           "header_phrase": "<sha256 hex of the phrase>", "use_session": False}},
}
```

A client is a *program* ("agent" in ChatStream) when its request carries
`X-FastSession-Skip: skip` (ChatStream's way to go without a session) or an
`X-ChatStream-Auth-Header`; otherwise it is a *browser*. A browser starts with the browser default
role (`auth_method: "nothing"`, `use_session: true`, required) and is promoted for good when it
types a role's UI pass phrase as chat input; a program has the role whose header phrase it sends,
else the program default role (`"nothing"`, `use_session: false`), else none (every API denied).

This module parses and checks a definition (errors at start-up, not at the first request, and
stricter than ChatStream: a pass phrase role without `use_session`, an unknown auth method or two
default roles are configuration errors) and answers "which role" questions; the request side is
`gateway/chatstream/access.py`. Phrases are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ChatStream 0.3.0's API names (`DefaultApiNames.API_NAMES`), in its order.
API_NAMES = ("chat_stream", "clear_context", "get_prompt", "set_generation_params",
             "get_generation_params", "set_feedback", "get_load", "get_resource_usage",
             "webui_index", "webui_js")
SKIP_SESSION_HEADER = "x-fastsession-skip"  # value "skip": a program, in ChatStream's terms
AUTH_HEADER = "x-chatstream-auth-header"
DEV_TOOL_HEADER = "X-ChatStream-API-DevTool-Enabled"

NOTHING = "nothing"
BROWSER_METHODS = ("ui_pass_phrase", "ui_pass_phrase_sha256")
PROGRAM_METHODS = ("header_phrase", "header_phrase_sha256")
# Where each method keeps its phrase, as ChatStream reads it (header_phrase_sha256 reads
# "header_phrase"; "header_phrase_sha256" is accepted too).
_PHRASE_KEYS = {"ui_pass_phrase": ("ui_pass_phrase",),
                "ui_pass_phrase_sha256": ("ui_pass_phrase_sha256",),
                "header_phrase": ("header_phrase",),
                "header_phrase_sha256": ("header_phrase", "header_phrase_sha256")}
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class Role:
    """One role: its name, the APIs it allows (None = "all"), and how it is granted."""

    name: str
    allow: frozenset[str] | None
    auth_method: str
    use_session: bool
    enable_dev_tool: bool = False
    secret: bytes = b""  # the phrase, or its SHA-256 digest for the *_sha256 methods

    def allows(self, api_name: str) -> bool:
        return api_name in API_NAMES and (self.allow is None or api_name in self.allow)

    def as_client_role(self) -> dict[str, Any]:
        """ChatStream's `client_role` dict (what its session held under
        `chat_stream_client_role`)."""
        allowed: Any = "all" if self.allow is None else sorted(self.allow)
        return {"client_role_name": self.name, "allowed_apis": allowed,
                "enable_dev_tool": self.enable_dev_tool}

    def matches(self, given: str | None) -> bool:
        """Whether `given` (a header value or a chat input) is this role's phrase."""
        if not given or not self.secret:
            return False
        data = given.encode()
        if self.auth_method.endswith("_sha256"):
            data = hashlib.sha256(data).digest()
        return hmac.compare_digest(data, self.secret)


class ClientRoles:
    """A checked `client_roles` definition."""

    def __init__(self, definition: Mapping[str, Any]) -> None:
        if not isinstance(definition, Mapping) or not definition:
            raise ValueError("client_roles must be a non-empty dict of role name -> "
                             "{'apis': {...}}")
        self.roles = [_parse_role(name, body) for name, body in definition.items()]
        self.browser_default = _one_default(self.roles, use_session=True)
        self.program_default = _one_default(self.roles, use_session=False)
        if self.browser_default is None:
            raise ValueError("client_roles has no default browser role: define one with "
                             "auth_method 'nothing' and use_session true (allow: [] denies "
                             "browsers everything)")
        self.pass_phrase_roles = [r for r in self.roles if r.auth_method in BROWSER_METHODS]
        self.header_roles = [r for r in self.roles if r.auth_method in PROGRAM_METHODS]
        self._by_name = {r.name: r for r in self.roles}

    @classmethod
    def from_file(cls, path: str) -> ClientRoles:
        """Roles from a JSON file holding ChatStream's `client_roles` dict."""
        try:
            definition = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read the client roles file {path!r}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"the client roles file {path!r} is not valid JSON: {exc}") from None
        try:
            return cls(definition)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def browser_role(self, stored_name: str | None) -> Role:
        """A browser's role: the one its session was promoted to, else the browser default."""
        role = self._by_name.get(stored_name or "")
        if role is not None and role.use_session:
            return role
        return self.browser_default  # type: ignore[return-value]  # checked in __init__

    def program_role(self, header_value: str | None) -> Role | None:
        """A program's role: the first whose header phrase it sent, else the program default."""
        for role in self.header_roles:
            if role.matches(header_value):
                return role
        return self.program_default

    def pass_phrase_role(self, user_input: str | None) -> Role | None:
        """The first role whose UI pass phrase `user_input` is, if any."""
        for role in self.pass_phrase_roles:
            if role.matches(user_input):
                return role
        return None


def is_program(headers: Mapping[str, str]) -> bool:
    """ChatStream's "agent" (no session) test, plus: sending a header phrase makes a program."""
    skip = headers.get(SKIP_SESSION_HEADER, "").strip().lower() == "skip"
    return skip or AUTH_HEADER in headers


def _parse_role(name: Any, body: Any) -> Role:
    where = f"client_roles[{name!r}]"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a role name must be a non-empty string")
    apis = body.get("apis") if isinstance(body, Mapping) else None
    if not isinstance(apis, Mapping):
        raise ValueError(f"{where}: expected {{'apis': {{'allow': ..., 'auth_method': ...}}}}")
    allow = apis.get("allow")
    if allow is None:
        raise ValueError(f"{where}: 'allow' property should be set ('all' or a list of APIs)")
    if allow == "all":
        allowed = None
    elif isinstance(allow, list | tuple):
        unknown = [a for a in allow if a not in API_NAMES]
        if unknown:
            raise ValueError(f"{where}: unknown API names {unknown}; known: {list(API_NAMES)}")
        allowed = frozenset(allow)
    else:
        raise ValueError(f"{where}: 'allow' must be 'all' or a list of API names")
    method = apis.get("auth_method")
    use_session = apis.get("use_session", False) is True
    dev_tool = apis.get("enable_dev_tool", False) is True
    if method == NOTHING:
        return Role(name, allowed, method, use_session, dev_tool)
    if method in BROWSER_METHODS and not use_session:
        raise ValueError(f"{where}: {method} is typed into a browser's chat, so the role needs "
                         "use_session: true")
    if method in PROGRAM_METHODS and use_session:
        raise ValueError(f"{where}: {method} is sent by programs (X-ChatStream-Auth-Header), "
                         "so the role needs use_session: false")
    if method not in _PHRASE_KEYS:
        known = [NOTHING, *BROWSER_METHODS, *PROGRAM_METHODS]
        raise ValueError(f"{where}: unknown auth_method {method!r}; known: {known}")
    phrase = next((apis[k] for k in _PHRASE_KEYS[method] if apis.get(k)), None)
    if not isinstance(phrase, str) or not phrase:
        raise ValueError(f"{where}: auth_method {method!r} needs a non-empty "
                         f"{_PHRASE_KEYS[method][0]!r}")
    if method.endswith("_sha256"):
        if not _SHA256_HEX.match(phrase):
            raise ValueError(f"{where}: {_PHRASE_KEYS[method][0]!r} must be the phrase's "
                             "SHA-256 as 64 hex digits")
        secret = bytes.fromhex(phrase)
    else:
        secret = phrase.encode()
    return Role(name, allowed, method, use_session, dev_tool, secret)


def _one_default(roles: list[Role], *, use_session: bool) -> Role | None:
    found = [r for r in roles if r.auth_method == NOTHING and r.use_session == use_session]
    if len(found) > 1:
        kind = "browser" if use_session else "program"
        raise ValueError(f"client_roles defines {len(found)} default {kind} roles "
                         f"({', '.join(r.name for r in found)}); only one may exist")
    return found[0] if found else None
