"""Request bodies (pydantic): validation and the OpenAPI schemas come from the same models.

Unknown fields are ignored so older and newer clients keep working; a body's `user_id` is
never read (the user is who authenticated). A limit pydantic does not enforce itself but a
route does (blank text, NUL characters) is still written into the schema here, as
`json_schema_extra`, so the document states it; tests/web/test_openapi.py checks that what
the document says is what the routes enforce.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    RootModel,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

MAX_MESSAGE = 32000
#: Marks a schema whose `maxLength` is AGENTD_MAX_MESSAGE_CHARS when that is lower: the
#: document is written with the serving process's settings (app/web/openapi.py).
MESSAGE_LIMIT = "x-agentd-max-message-chars"
#: JSON Schema `pattern`s for what the routes check by hand. `\s` in a JSON Schema (ECMA)
#: regex is not quite `str.isspace`, so "not blank" names Python's whitespace exactly.
NOT_BLANK = "[^\\t-\\r\\x1c- \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
NO_NUL = "^[^\\x00]*$"


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


StorableText = Annotated[str, AfterValidator(_storable_text),
                         Field(json_schema_extra={"pattern": NO_NUL})]
MessageText = Annotated[StorableText, Field(
    min_length=1, max_length=MAX_MESSAGE, json_schema_extra={MESSAGE_LIMIT: True})]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"message": "What is 6 times 7?"}]})

    message: MessageText = Field(description="the user's message (no NUL characters)")
    session_id: str | None = Field(None, max_length=64, description=(
        "continue this session (from an earlier answer); without it, a new session"))
    timeout: float | None = Field(None, ge=1, le=600, description=(
        "seconds the run may take, at most AGENTD_RUN_TIMEOUT"))
    cache: bool | None = Field(None, description=(
        "may be answered from the answer cache (default: AGENTD_CACHE_DEFAULT)"))


class StreamRequest(ChatRequest):
    on_disconnect: Literal["cancel", "continue"] = Field("cancel", description=(
        "what happens to the run when the client goes away"))


class RunRequest(ChatRequest):
    on_disconnect: Literal["cancel", "continue"] = Field("continue", description=(
        "what happens to the run when a client following its events goes away"))


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"messages": ["Summarise chapter 1", "Summarise chapter 2"], "priority": 7}]})

    messages: list[MessageText] = Field(min_length=1, max_length=100, description=(
        "each message is its own run"))
    priority: int = Field(5, ge=0, le=9, description="higher runs first")
    session_id: str | None = Field(None, max_length=64, description=(
        "the session every run of the batch adds to"))
    cache: bool | None = Field(None, description="as in ChatRequest")


class ToolArguments(RootModel[dict[str, Any]]):
    """A tool's arguments: a JSON object checked against the tool's `parameters` (GET
    /api/tools) by the tool registry; an empty body is `{}`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"expression": "6 * 7"}]})


# OpenAI's chat completion request (/v1, app/web/openai_compat.py) ----------------------------
#
# Checked field by field, in this order, the way OpenAI refuses: each failure is a
# PydanticCustomError whose type is OpenAI's `code` and whose ctx names the `param`
# (`parse_request` turns the first into the 400). The annotations give the schema; the
# validators are what is enforced (only the last user message's content is read at all).

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: A required field that is absent or null.
MISSING = {"model": "you must provide a model parameter",
           "messages": "missing required parameter: 'messages'"}


def refused(param: str, message: str, code: str = "invalid_value") -> PydanticCustomError:
    return PydanticCustomError(code, message, {"param": param})


def _model_name(value: Any) -> str:
    if value is None:
        raise refused("model", MISSING["model"], "missing_required_parameter")
    if not isinstance(value, str) or not value:
        raise refused("model", "model must be a non-empty string", "invalid_type")
    return value


def _checked_messages(messages: Any, info: ValidationInfo) -> list[dict[str, Any]]:
    if messages is None:
        raise refused("messages", MISSING["messages"], "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise refused("messages", "messages must be a non-empty array", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise refused(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise refused(f"messages[{i}].role",
                          f"role must be one of {', '.join(sorted(ROLES))}")
    last = last_user(messages)
    if last is None:
        raise refused("messages", "messages must contain a user message")
    max_chars = (info.context or {}).get("max_chars", MAX_MESSAGE)
    param = f"messages[{last}].content"
    text = text_of(messages[last].get("content"), param)
    if not text.strip():
        raise refused(param, "the last user message has no text")
    if len(text) > max_chars:
        raise refused(param, f"the last user message is over {max_chars} characters",
                      "string_above_max_length")
    if not storable(text):
        raise refused(param, "NUL characters and lone surrogates are not allowed")
    return messages


def last_user(messages: list[dict[str, Any]]) -> int | None:
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    return users[-1] if users else None


def text_of(content: Any, param: str) -> str:
    """A message's text: a string, or the `text` of its parts of type `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content
                 if isinstance(part, dict) and part.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    raise refused(param, "content must be a string or an array of text parts", "invalid_type")


def _flag(value: Any, info: ValidationInfo) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise refused(str(info.field_name), f"{info.field_name} must be a boolean",
                      "invalid_type")
    return value


def _one(value: Any) -> int | None:
    if value is not None and value != 1:
        raise refused("n", "agentd answers with one choice: n must be 1")
    return None if value is None else 1


def _session_id(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 64):
        raise refused("session_id", "session_id must be a session id from an earlier answer",
                      "invalid_type")
    return value


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 600:
        raise refused("timeout", "timeout must be a number of seconds from 1 to 600")
    return float(value)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="only parts of type `text` are read")
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["assistant", "developer", "function", "system", "tool", "user"]
    content: str | list[ContentPart] | None = Field(None, description=(
        "read only in the last `user` message, which must have text: at most "
        "AGENTD_MAX_MESSAGE_CHARS characters, no NUL characters"))


def _checked(check: Any, documented: Any) -> PlainValidator:
    """Validated by `check` alone (no second pass by pydantic's own type checks, which would
    refuse what OpenAI's rules allow, lone surrogates in a name say), documented as
    `documented`."""
    return PlainValidator(check, json_schema_input_type=documented)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "agentd", "messages": [{"role": "user", "content": "What is 6 times 7?"}]}]})

    model: Annotated[str, _checked(_model_name, Annotated[str, Field(min_length=1)])] = Field(
        description="required, but agentd answers with its configured model whatever it names")
    messages: Annotated[list[dict[str, Any]], _checked(
        _checked_messages, Annotated[list[ChatMessage], Field(min_length=1, json_schema_extra={
            "contains": {"properties": {"role": {"const": "user"}}, "required": ["role"]}})],
    )] = Field(
        description=("the run's message is the last `user` message; the others are not "
                     "sent (history is the session's)"))
    n: Annotated[int | None, _checked(_one, Literal[1] | None)] = None
    stream: Annotated[bool | None, _checked(_flag, bool | None)] = Field(None, description=(
        "server-sent `chat.completion.chunk`s, then `data: [DONE]`"))
    session_id: Annotated[str | None, _checked(
        _session_id, Annotated[str, Field(min_length=1, max_length=64)] | None)] = Field(
        None, description="agentd extension: continue the session an earlier answer names")
    timeout: Annotated[float | None, _checked(
        _timeout, Annotated[float, Field(ge=1, le=600)] | None)] = Field(
        None, description="agentd extension: seconds the run may take")
    cache: Annotated[bool | None, _checked(_flag, bool | None)] = Field(None, description=(
        "agentd extension: may be answered from the answer cache"))

    def message(self) -> str:
        """The run's message: the last user message's text (the validators checked it)."""
        last = last_user(self.messages)
        assert last is not None
        return text_of(self.messages[last].get("content"), "")
