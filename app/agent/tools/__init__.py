"""The tool registry: what the agent may call, described to the LLM, called safely.

A tool's arguments come from an LLM, so they are untrusted input: the registry checks them
against the tool's JSON schema (enough to tell the model exactly what it got wrong), bounds
every call with a timeout, and turns every failure into a `ToolOutcome` with a readable
message. The model reads that message and can correct itself; a tool never crashes a run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

__all__ = [
    "Tool",
    "ToolError",
    "ToolOutcome",
    "ToolRegistry",
    "default_registry",
]

# OpenAI's rule for function names; checked at registration so a bad name fails at start,
# not as a 400 from the LLM in the middle of a run.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_TIMEOUT: Final = 30.0

# Error codes in `ToolOutcome.error_code`: stable labels for metrics and the HTTP layer.
UNKNOWN_TOOL: Final = "unknown_tool"
INVALID_ARGUMENTS: Final = "invalid_arguments"
TIMEOUT: Final = "timeout"
TOOL_ERROR: Final = "tool_error"


class ToolError(Exception):
    """Raised by a tool for an expected failure; its message is shown to the model as is."""


@dataclass(frozen=True, slots=True)
class Tool:
    """A callable the LLM may use. `parameters` is a JSON schema of type `object`.

    `call` receives arguments already checked against `parameters`. `timeout` overrides the
    registry's default for tools known to be slower (or faster) than usual.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    call: Callable[[dict[str, Any]], Awaitable[Any]]
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What a call produced. Exactly one of `result` (on success) or `error` is meaningful."""

    success: bool
    result: Any = None
    error: str | None = None
    error_code: str | None = None

    @classmethod
    def failed(cls, code: str, message: str) -> ToolOutcome:
        return cls(success=False, error=message, error_code=code)


class ToolRegistry:
    """Tools by name, in registration order (the order the LLM sees them)."""

    def __init__(self, *, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self._tools: dict[str, Tool] = {}
        self._default_timeout = default_timeout

    def register(self, tool: Tool, *, replace: bool = False) -> None:
        """Add a tool. A second tool of the same name is a programming error unless `replace`."""
        if not _NAME.match(tool.name):
            raise ValueError(f"tool name {tool.name!r} must match {_NAME.pattern}")
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name!r}: parameters must be a JSON schema of type object")
        if tool.name in self._tools and not replace:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def tools(self) -> list[Tool]:
        return list(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def openai_tools(self) -> list[dict[str, Any]]:
        """The `tools` field of an OpenAI chat completion request."""
        return [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in self._tools.values()
        ]

    async def call(
        self, name: str, arguments: str | Mapping[str, Any] | None = None
    ) -> ToolOutcome:
        """Call a tool with arguments as the LLM sent them (a JSON string) or as a mapping.

        Never raises for anything the tool or its arguments do; only cancellation from
        outside propagates, as it must.
        """
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return ToolOutcome.failed(UNKNOWN_TOOL, f"unknown tool {name!r} (available: {known})")
        try:
            args = parse_arguments(arguments)
        except ToolError as exc:
            return ToolOutcome.failed(INVALID_ARGUMENTS, f"invalid arguments for {name}: {exc}")
        problems = validate_arguments(tool.parameters, args)
        if problems:
            message = f"invalid arguments for {name}: " + "; ".join(problems)
            return ToolOutcome.failed(INVALID_ARGUMENTS, message)
        return await self._invoke(tool, args)

    async def _invoke(self, tool: Tool, args: dict[str, Any]) -> ToolOutcome:
        timeout = self._default_timeout if tool.timeout is None else tool.timeout
        with trio.move_on_after(timeout) as scope:
            try:
                result = await tool.call(args)
            except ToolError as exc:
                return ToolOutcome.failed(TOOL_ERROR, f"{tool.name}: {exc}")
            except Exception as exc:  # the point: no bug in a tool may end a run
                return ToolOutcome.failed(TOOL_ERROR, _describe_crash(tool.name, exc))
        if scope.cancelled_caught:
            return ToolOutcome.failed(TIMEOUT, f"{tool.name} timed out after {timeout:g} s")
        return _checked_result(tool.name, result)


def _describe_crash(name: str, exc: BaseException) -> str:
    detail = str(exc) or "no details"
    return f"{name} failed unexpectedly ({type(exc).__name__}: {detail})"


def _checked_result(name: str, result: Any) -> ToolOutcome:
    # The result goes back to the LLM as JSON; finding out it cannot be serialised only when
    # the run builds its next request would fail the run, so check here, once.
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return ToolOutcome.failed(TOOL_ERROR, f"{name} returned a result that is not JSON: {exc}")
    return ToolOutcome(success=True, result=result)


def parse_arguments(arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Arguments as a dict. Models send `""` or nothing for tools without parameters."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ToolError(f"arguments are not valid JSON ({exc})") from None
    if not isinstance(arguments, Mapping):
        raise ToolError(f"arguments must be a JSON object, got {_json_type(arguments)}")
    return dict(arguments)


def validate_arguments(schema: Mapping[str, Any], args: Mapping[str, Any]) -> list[str]:
    """Problems with `args` under an object schema; empty when they are acceptable.

    Deliberately partial JSON Schema: required keys, unknown keys when `additionalProperties`
    is false, and the `type` and `enum` of each top-level property. That catches what models
    actually get wrong, without a schema library on the agent's path.
    """
    properties: Mapping[str, Any] = schema.get("properties") or {}
    problems = [
        f"missing required argument {key!r}"
        for key in schema.get("required", ())
        if key not in args
    ]
    if schema.get("additionalProperties") is False:
        allowed = ", ".join(properties) or "none"
        problems += [
            f"unexpected argument {key!r} (allowed: {allowed})"
            for key in args
            if key not in properties
        ]
    for key, value in args.items():
        spec = properties.get(key)
        if isinstance(spec, Mapping):
            problems += _property_problems(key, spec, value)
    return problems


def _property_problems(key: str, spec: Mapping[str, Any], value: Any) -> list[str]:
    expected = spec.get("type")
    if expected is not None:
        allowed = [expected] if isinstance(expected, str) else list(expected)
        if not any(_is_type(value, name) for name in allowed):
            wanted = " or ".join(allowed)
            return [f"argument {key!r} must be {wanted}, got {_json_type(value)}"]
    choices = spec.get("enum")
    if choices is not None and value not in choices:
        return [f"argument {key!r} must be one of {json.dumps(choices)}, got {value!r}"]
    return []


def _is_type(value: Any, name: str) -> bool:
    # bool is an int in Python but not a number in JSON; JSON Schema counts 2.0 as an integer.
    if name == "integer":
        if isinstance(value, float):
            return math.isfinite(value) and value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    python_type = _JSON_TYPES.get(name)
    return python_type is not None and isinstance(value, python_type)


_JSON_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "string": str,
    "boolean": bool,
    "array": (list, tuple),
    "object": Mapping,
    "null": type(None),
}


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages a model understands."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def default_registry() -> ToolRegistry:
    """A registry with the built-in tools (`calculator`, `current_time`).

    Other tools (knowledge-base search, web search) need live services, so their owners add
    them with `register` once those exist.
    """
    # Imported here, not at the top: the tool modules import `Tool` from this package, and
    # a top-level import would make each half of the package depend on the other loading first.
    from app.agent.tools.calculator import calculator_tool
    from app.agent.tools.clock import clock_tool

    registry = ToolRegistry()
    registry.register(calculator_tool())
    registry.register(clock_tool())
    return registry
