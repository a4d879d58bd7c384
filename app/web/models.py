"""Request bodies (pydantic): validation and the OpenAPI schemas come from the same models.

Unknown fields are ignored so older and newer clients keep working; a body's `user_id` is
never read (the user is who authenticated).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_MESSAGE = 32000


def storable(value: str, *, allow_nul: bool = False) -> bool:
    """Text PostgreSQL can keep: valid UTF-8 (no lone surrogates) and, in text columns, no NUL."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return allow_nul or "\x00" not in value


def _storable_text(value: str) -> str:
    if not storable(value):
        raise ValueError("NUL characters and lone surrogates are not allowed")
    return value


StorableText = Annotated[str, AfterValidator(_storable_text)]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: StorableText = Field(min_length=1, max_length=MAX_MESSAGE)
    session_id: str | None = Field(None, max_length=64)
    timeout: float | None = Field(None, ge=1, le=600)
    cache: bool | None = None


class StreamRequest(ChatRequest):
    on_disconnect: Literal["cancel", "continue"] = "cancel"


class RunRequest(ChatRequest):
    on_disconnect: Literal["cancel", "continue"] = "continue"


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Annotated[StorableText, Field(min_length=1, max_length=MAX_MESSAGE)]] = Field(
        min_length=1, max_length=100)
    priority: int = Field(5, ge=0, le=9)
    session_id: str | None = Field(None, max_length=64)
    cache: bool | None = None


class ToolCallRequest(BaseModel):
    model_config = ConfigDict(extra="allow")


def openapi_document(paths: dict[str, Any]) -> dict[str, Any]:
    schemas = {m.__name__: m.model_json_schema(ref_template="#/components/schemas/{model}")
               for m in (ChatRequest, StreamRequest, RunRequest, BatchRequest)}
    return {"openapi": "3.1.0", "info": {"title": "agentd", "version": "0.1.0"},
            "paths": paths, "components": {"schemas": schemas}}
