"""Request validation errors as a client reads them: the field as the client wrote it.

pydantic reports where a value failed as a `loc` that includes its own internals: the branch of
a union it tried (`messages.0.content.str`, `...list[ContentPart]`), not only field names and
indexes. `request_error()` walks the loc along the model's types, keeps what the client wrote
(`messages[0].content`), picks the branch that got furthest, and words the problem the way
OpenAI's API does (`Invalid type for 'max_tokens': expected an integer, but got a string
instead.`), as a 400 whose `param` is that path.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from chatstream_cluster.gateway.errors import APIError

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}


def json_type(value: Any) -> str:
    """What a JSON value is, in words: `a string`, `an integer`, `null`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold, with Annotated, Optional and unions unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def client_path(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """`loc` as the client wrote the field: `messages[0].content`, without union branches."""
    out = ""
    candidates: list[Any] = [model] if model is not None else []
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
            candidates = [typing.get_args(c)[0] for c in candidates
                          if typing.get_origin(c) is list and typing.get_args(c)]
            candidates = [m for c in candidates for m in _members(c)]
            continue
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        owner = next((c for c in models if item in c.model_fields), None)
        if owner is not None:
            out += f".{item}" if out else str(item)
            candidates = _members(owner.model_fields[item].annotation)
        elif model is None or not candidates:
            out += f".{item}" if out else str(item)  # no type to walk: keep it as it is
        # else: the name of a union branch pydantic tried; the client never wrote it
    return out


def request_error(exc: ValidationError, model: type[BaseModel] | None = None) -> APIError:
    """A 400 for the most telling problem of `exc`, naming the field as the client wrote it."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request", code="invalid_value")
    paths = [client_path(model, tuple(e.get("loc", ()))) for e in errors]
    # The union branch that matched the input's type goes deeper than the others: report it.
    depth = max(len(_split(p)) for p in paths)
    deepest = [(p, e) for p, e in zip(paths, errors, strict=True) if len(_split(p)) == depth]
    path, first = deepest[0]
    same_place = [e for p, e in deepest if p == path]
    kind = first.get("type", "")
    param = path or None
    where = f"'{path}'" if path else "the request body"
    if kind == "missing":
        return APIError(400, f"Missing required parameter: {where}.",
                        code="missing_required_parameter", param=param)
    if kind == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    expected = [_EXPECTED[e["type"]] for e in same_place if e.get("type") in _EXPECTED]
    if expected and len(expected) == len(same_place):
        wanted = " or ".join(dict.fromkeys(expected))
        got = json_type(first.get("input"))
        return APIError(400, f"Invalid type for {where}: expected {wanted}, but got {got} "
                        "instead.", code="invalid_type", param=param)
    return APIError(400, f"Invalid value for {where}: {first.get('msg', 'invalid')}.",
                    code="invalid_value", param=param)


def _split(path: str) -> list[str]:
    return path.replace("[", ".[").split(".") if path else []
