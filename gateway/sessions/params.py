"""ChatStream's generation params of a session: validation, defaults, sampling.

`/set_generation_params` takes any subset of `temperature` (0-1), `top_k_value` (1-500) and
`top_p_value` (0-1); a wrong one is a 400 that names it, with ChatStream's message.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatstream_cluster.gateway.errors import APIError, validation_error
from chatstream_cluster.shared.schemas import SamplingParams

# ChatStream's defaults (its constructor: temperature=1.0, top_k=50, top_p=1.0).
DEFAULT_PARAMS: dict[str, float | int] = {"temperature": 1.0, "top_k_value": 50, "top_p_value": 1.0}


class GenerationParams(BaseModel):
    """Body of /set_generation_params: any subset; null resets a field to its default."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None
    top_k_value: Annotated[int, Field(strict=True, ge=1, le=500)] | None = None
    top_p_value: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None


PARAM_RANGES = {"temperature": "0.0 to 1.0", "top_k_value": "1 to 500", "top_p_value": "0.0 to 1.0"}


def params_error(exc: ValidationError) -> APIError:
    """A 400 that names the bad or unknown generation param."""
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first.get("loc") else None
    if name not in PARAM_RANGES:
        if first.get("type") == "extra_forbidden":
            known = ", ".join(PARAM_RANGES)
            return APIError(400, f"unknown generation param {name!r}; known: {known}",
                            code="unknown_param", param=name)
        return validation_error(list(exc.errors()))
    return APIError(400, f"Invalid {name} value. {name} should be from {PARAM_RANGES[name]}.",
                    code="invalid_value", param=name)


def sampling_for(params: dict[str, Any], max_tokens: int) -> SamplingParams:
    """SamplingParams from ChatStream's (merged) generation params."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(params["temperature"]),
        top_k=int(params["top_k_value"]),
        top_p=max(float(params["top_p_value"]), 1e-6),  # top_p 0 means "most likely token only"
    )


