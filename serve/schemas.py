"""Request bodies of OpenAI's Images API (the DALL-E 2 subset) plus our extensions, and its error body.

Unknown fields are refused naming them, as OpenAI does, so a client that asks for something this
server cannot do (a style, a transparent background) hears so instead of getting a silently
different image. The bounds here are the runtime's (`runtime.validate`), plus the service's own:
at most 10 images, a 1000-character prompt (DALL-E 2's limits) and guidance scales up to 100.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SEED = 2**63 - 1
MAX_SCALE = 100.0
SuperResSteps = Annotated[int, Field(ge=2, le=1000, strict=True)]
OutputFormat = Literal["png", "jpeg", "webp"]  # OpenAI's `output_format` choices (serve.encoding writes them)


class APIError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Sampling(BaseModel):
    """Our extensions: the seed, steps, guidance scales and prior of a request."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    prior_steps: int | None = Field(None, ge=1, le=1000, strict=True)
    decoder_steps: int | None = Field(None, ge=1, le=1000, strict=True)
    super_res_steps: SuperResSteps | list[SuperResSteps] | None = None  # one for every stage, or one per stage
    prior_guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    decoder_guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE)
    prior: Literal["diffusion", "ar"] | None = None

    @field_validator("prior_guidance_scale", "decoder_guidance_scale", mode="before")
    @classmethod
    def _finite_number(cls, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError("must be a finite number")
        return value


class GenerationRequest(Sampling):
    """`POST /v1/images/generations`."""

    prompt: str = Field(max_length=1000, strict=True)
    model: str | None = None
    n: int | None = Field(1, ge=1, le=10, strict=True)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    quality: Literal["standard", "auto"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100, strict=True)
    stream: Literal[False] | None = None


class VariationRequest(BaseModel):
    """`POST /v1/images/variations` (multipart form; numbers arrive as text)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    n: int | None = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    decoder_steps: int | None = Field(None, ge=1, le=1000)
    decoder_guidance_scale: float | None = Field(None, ge=0, le=MAX_SCALE)


def validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic `ValidationError` as a 400 naming the field."""
    first = exc.errors()[0]
    # the field's name and list indices; not the names pydantic gives the branches of a union
    loc = [p for i, p in enumerate(first.get("loc", ())) if i == 0 or isinstance(p, int)]
    param = ".".join(str(p) for p in loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    given = first.get("input")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {given!r}).", param=param,
                    code="invalid_value")
