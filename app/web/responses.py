"""What the routes answer, as pydantic models: for the OpenAPI document only.

The routes build plain dicts (some on hot paths) and never go through these; the models say
what those dicts hold, and tests/web/test_openapi.py checks the two against each other
(`run_view`, `status_view`, `completion_body`, the knowledge base's rows, the live routes).
Fields are required when every answer has them; `extra="allow"` where the contract says
more may be added (API.md: `{"run_id", …}`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Where the document keeps a named schema.
REF = "#/components/schemas/{model}"
RunStatus = Literal["queued", "running", "completed", "cancelled", "failed", "interrupted"]
Reason = Literal["completed", "cancelled", "server_shutdown", "timeout", "error"]


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# Health -------------------------------------------------------------------------------------


class Live(BaseModel):
    status: Literal["alive"]


class Ready(BaseModel):
    status: Literal["ready"]


class NotReady(BaseModel):
    status: Literal["starting", "draining", "degraded"]


class HealthChecks(BaseModel):
    database: Literal["ok", "unavailable", "timeout"]
    redis: Literal["ok", "unavailable", "timeout"]
    embedding: Literal["ok", "unavailable"]
    llm: str = Field(description="`configured`, or that the local provider answers")


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"] = Field(
        description="healthy when PostgreSQL and Redis answer (the embedding process is "
                    "not needed for chat)")
    checks: HealthChecks
    timestamp: float = Field(description="Unix time of the checks (cached for a second)")


class Status(Open):
    version: str
    uptime_s: float | None = Field(description="since the supervisor started")
    open_streams: int = Field(description="in this web process")
    requests_in_flight: int = Field(description="in this web process")
    draining: bool
    runs: dict[str, int] = Field(description="runs by status, all users")
    processes: list[dict[str, Any]] = Field(description="every process of the tree")
    restarts_by_role: dict[str, int]


# Runs ---------------------------------------------------------------------------------------


class ChatAnswer(BaseModel):
    response: str = Field(description="the assistant's answer")
    session_id: str
    message_id: str | None = Field(description="the stored assistant message")
    run_id: str
    reason: Reason | None
    iterations: int = Field(description="LLM turns")
    duration_ms: float | None
    usage: dict[str, Any] = Field(description="token counts the LLM reported")
    cached: bool = Field(description="answered from the answer cache")


class RunCreated(BaseModel):
    run_id: str
    session_id: str
    status: Literal["queued"]


class Run(Open):
    run_id: str
    session_id: str
    status: RunStatus
    output: str = Field(description="the answer so far (all of it once completed)")
    reason: Reason | None = Field(description="why it ended; null until it has")
    detail: str | None = Field(description="for a run that did not complete: what to do")
    message_id: str | None
    fallback: str | None = Field(description="`max_iterations` or `time_budget` when the "
                                             "last answer was made without tools")
    iterations: int
    usage: dict[str, Any]
    cached: bool
    priority: int
    attempts: int = Field(description="times an agent took the run")
    duration_ms: float | None
    created_at: str = Field(json_schema_extra={"format": "date-time"})


class Cancelling(BaseModel):
    run_id: str
    status: Literal["cancelling", "completed", "cancelled", "failed", "interrupted"] = Field(
        description="`cancelling`, or the final status of a run that had already ended")


class Message(Open):
    message_id: str
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    status: Literal["complete", "interrupted", "cancelled", "error"] | None = Field(
        description="an assistant message's; null for the user's")
    tool_calls: list[dict[str, Any]] | None
    tool_results: list[dict[str, Any]] | None
    run_id: str | None
    created_at: str = Field(json_schema_extra={"format": "date-time"})


class Messages(BaseModel):
    session_id: str
    messages: list[Message] = Field(description="oldest first")


class BatchCreated(BaseModel):
    batch_id: str
    run_ids: list[str] = Field(description="one per message, in order")


class BatchRun(BaseModel):
    run_id: str
    status: RunStatus
    reason: Reason | None


class Batch(BaseModel):
    batch_id: str
    status: Literal["queued", "running", "done"]
    counts: dict[str, int] = Field(description="runs by status")
    runs: list[BatchRun]


# Tools --------------------------------------------------------------------------------------


class ToolInfo(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any] = Field(description="a JSON schema of the arguments")


class Tools(BaseModel):
    tools: list[ToolInfo]


class ToolOutcome(BaseModel):
    success: bool
    result: Any = Field(description="what the tool returned, when it succeeded")
    error: str | None = Field(description="why it failed (bad arguments included)")


# Knowledge base -----------------------------------------------------------------------------


class DocumentAdded(BaseModel):
    document_id: str = Field(description="the earlier document's when this replaced it")
    chunks: int


class DocumentInfo(Open):
    document_id: str
    source: str | None
    title: str | None
    chunks: int = Field(description="0 while (re)indexing or after a failed add")
    content_hash: str = Field(description="sha256 of the text")
    metadata: dict[str, Any]
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    updated_at: str = Field(json_schema_extra={"format": "date-time"})


class Documents(BaseModel):
    documents: list[DocumentInfo] = Field(description="the caller's, oldest first")


class SearchResult(BaseModel):
    document_id: str | None
    text: str | None
    score: float | None = Field(description="higher is closer")
    source: str | None
    title: str | None
    chunk: int | None = Field(description="the chunk's index in its document")


class SearchResults(BaseModel):
    results: list[SearchResult] = Field(description="best first")


# OpenAI-compatible (/v1) --------------------------------------------------------------------


class AgentdRun(BaseModel):
    run_id: str
    session_id: str
    message_id: str | None
    reason: Reason | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class Choice(BaseModel):
    index: int
    logprobs: None
    finish_reason: Literal["stop"]
    message: AssistantMessage


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the model agentd answered with")
    system_fingerprint: None
    choices: list[Choice]
    usage: Usage
    agentd: AgentdRun = Field(description="the run behind the answer")


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model] = Field(description="the one model agentd answers with")


# JSON schema literals: errors (app/web/errors.py writes them) and run events (app/events.py)

_STRING = {"type": "string"}
_ERROR_BODY = {"type": "object", "required": ["code", "message"], "properties": {
    "code": {"type": "string", "description": "snake_case, stable: what went wrong"},
    "message": {"type": "string", "description": "a sentence a person can act on"}}}
_OPENAI_BODY = {"type": "object", "required": ["message", "type", "code", "param"],
                "properties": {"message": _STRING, "type": _STRING, "code": _STRING,
                               "param": {"type": ["string", "null"]}}}
ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": _ERROR_BODY},
              "description": "agentd's error shape"},
    "ChatOutcome": {
        "description": "a run that did not complete, with what was saved",
        "allOf": [{"$ref": REF.format(model="Error")}],
        "type": "object", "required": ["run_id", "message_id", "response"], "properties": {
            "run_id": _STRING, "message_id": {"type": ["string", "null"]},
            "response": {"type": "string", "description": "the partial answer, as stored"}}},
    "OpenAIError": {"type": "object", "required": ["error"],
                    "properties": {"error": _OPENAI_BODY}, "description": "OpenAI's shape"},
    "CompletionOutcome": {
        "description": "a run that did not complete, with what was saved",
        "allOf": [{"$ref": REF.format(model="OpenAIError")}],
        "type": "object", "required": ["agentd"], "properties": {"agentd": {
            "type": "object", "required": ["run_id", "session_id", "message_id", "reason",
                                           "content"],
            "properties": {"run_id": _STRING, "session_id": _STRING,
                           "message_id": {"type": ["string", "null"]},
                           "reason": {"type": ["string", "null"]},
                           "content": {"type": "string", "description": "the partial answer"}}}}},
}

RUN_EVENT: dict[str, Any] = {
    "description": "the `data` of one server-sent event of a run (its `event:` is `type`)",
    "type": "object", "required": ["type", "run_id"],
    "properties": {
        "type": {"enum": ["run", "thinking", "token", "tool_call", "tool_result", "end"]},
        "run_id": _STRING,
        "session_id": {"type": "string", "description": "run"},
        "status": {"type": "string", "description": "run"},
        "content": {"type": "string", "description": "token: text to append"},
        "call_id": {"type": "string", "description": "tool_call, tool_result"},
        "name": {"type": "string", "description": "tool_call, tool_result"},
        "arguments": {"type": "string", "description": "tool_call: JSON text"},
        "result": {"description": "tool_result, when the tool succeeded"},
        "error": {"type": "string", "description": "tool_result, when it failed"},
        "reason": {"enum": ["completed", "cancelled", "server_shutdown", "timeout", "error"],
                   "description": "end"},
        "message_id": {"type": ["string", "null"], "description": "end: the stored message"},
        "resumable": {"type": "boolean", "description": "end"},
        "detail": {"type": "string", "description": "end: what to do, when not completed"},
        "fallback": {"enum": ["max_iterations", "time_budget"], "description": (
            "end: the last answer was made without tools, for this reason")},
    },
}
