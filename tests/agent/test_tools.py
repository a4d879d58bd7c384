"""The tool registry, the calculator and the clock: untrusted arguments in, outcomes out."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from datetime import UTC, datetime

import pytest
import trio

from app.agent.tools import (
    INVALID_ARGUMENTS,
    TIMEOUT,
    TOOL_ERROR,
    UNKNOWN_TOOL,
    Tool,
    ToolError,
    ToolRegistry,
    default_registry,
    validate_arguments,
)
from app.agent.tools.calculator import MAX_LENGTH, CalculatorError, evaluate
from app.agent.tools.clock import clock_tool, describe_time, resolve_timezone

# ---------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3", 5),
        ("  2 + 3 * 4 ", 14),
        ("(2 + 3) * 4", 20),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("+-+3", -3),
        ("1e3 + 0.5", 1000.5),
        ("1_000 * 3", 3000),
        ("0x10 + 0b11", 19),
        ("sqrt(16)", 4.0),
        ("sqrt(2) ** 2", pytest.approx(2.0)),
        ("sin(0) + cos(0)", 1.0),
        ("tan(pi / 4)", pytest.approx(1.0)),
        ("log(e)", 1.0),
        ("log(8, 2)", pytest.approx(3.0)),
        ("log10(1000)", pytest.approx(3.0)),
        ("exp(0)", 1.0),
        ("abs(-3.5)", 3.5),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("round(1234, -2)", 1200),
        ("floor(-2.5)", -3),
        ("ceil(2.1)", 3),
        ("2 * pi", 2 * math.pi),
        ("(((((1 + 2)))))", 3),
        ("2 ** 1023", 2**1023),
        ("10 ** 300 / 0.5", 2e300),
        ("2 ** -2000", 0.0),
        ("(-2) ** 3", -8),
        ("1 ** 10000", 1),
        ("0 ** 0", 1),
    ],
)
def test_calculator_computes(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("7 // 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "sqrt(-1) is undefined"),
        ("log(0)", "log(0) is undefined"),
        ("log(-(2 ** 1000))", "digits"),
        ("(-8) ** (1/3)", "not a real number"),
        ("exp(1000)", "too large"),
        ("1e308 * 10", "too large"),
        ("2 ** 1024", "too large"),
        ("3 ** 1000", "too large"),
        ("(-2) ** 1025", "too large"),
        ("1.5 ** 10000", "too large"),
        ("0.5 ** -2000", "too large"),
        ("9 ** 9 ** 9", "exponents above"),
        ("2 ** 100000", "exponents above"),
        ("10 ** 200 * 10 ** 200", "too large"),
        ("1" * 400, "too large"),
        ("round(5, -1000)", "at most 100 digits"),
        ("round(2.5, 1.5)", "whole number"),
        ("sin()", "takes 1 argument"),
        ("log(1, 2, 3)", "takes 1 or 2 argument"),
        ("sqrt(x=4)", "keyword"),
        ("2 ^ 3", "use **"),
        ("1j", "complex"),
        ("", "empty"),
        ("   ", "empty"),
        ("1 +", "not a valid expression"),
        ("1 2", "not a valid expression"),
        ("\x00", "not a valid expression"),
    ],
)
def test_calculator_errors_are_clear(expression, message):
    with pytest.raises(CalculatorError, match="(?i)" + re.escape(message)):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "__import__",
        "open('/etc/passwd')",
        "().__class__.__bases__[0].__subclasses__()",
        "(1).__class__",
        "math.sqrt(4)",
        "sqrt.__call__(4)",
        "(lambda: 1)()",
        "lambda x: x",
        "[x for x in range(10)]",
        "(x := 5)",
        "x",
        "True + 1",
        "None",
        "'a' * 3",
        "f'{1}'",
        "b'x'",
        "1 if 1 else 2",
        "1 < 2",
        "1 and 2",
        "not 1",
        "~1",
        "1 << 100",
        "1 | 2",
        "[1, 2][0]",
        "{1: 2}",
        "(1, 2)",
        "*a",
        "sqrt(*[4])",
        "eval('1')",
        "exec('1')",
        "print(1)",
        "5()",
        "sqrt(4)(2)",
        "globals()",
        "sqrt",
    ],
)
def test_calculator_refuses_hostile_input(expression):
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_calculator_refuses_long_expressions_before_parsing():
    with pytest.raises(CalculatorError, match=f"longer than {MAX_LENGTH}"):
        evaluate("1+" * 300 + "1")


def test_calculator_refuses_deep_nesting():
    with pytest.raises(CalculatorError, match="nested"):
        evaluate("-" * 60 + "1")
    with pytest.raises(CalculatorError, match="nested"):
        evaluate("sqrt(" * 60 + "1" + ")" * 60)
    with pytest.raises(CalculatorError):
        evaluate("(" * 250 + "1" + ")" * 250)


def test_calculator_refuses_too_many_nodes():
    with pytest.raises(CalculatorError, match="parts"):
        evaluate("+".join(["1"] * 240))


def test_hostile_expressions_fail_fast():
    hostile = ["9**9**9", "2**10000*2**10000", "10**10000", "round(7, -100)", "(-1)**10000"]
    start = time.perf_counter()
    for expression in hostile:
        with contextlib.suppress(CalculatorError):
            evaluate(expression)
    assert time.perf_counter() - start < 0.5


def test_calculator_never_leaks_a_python_exception():
    # Anything that is not a CalculatorError would reach the registry as a "crash".
    samples = ["1" + op + "0" for op in ["/", "//", "%", "**", "*", "-", "+"]]
    samples += [
        f"{fn}({arg})"
        for fn in [
            "sqrt",
            "log",
            "log10",
            "exp",
            "floor",
            "ceil",
            "round",
            "abs",
            "sin",
            "cos",
            "tan",
        ]
        for arg in ["-1", "0", "1e308", "-(2**1000)", "2**1000", "1, 0", "1, 1"]
    ]
    for expression in samples:
        try:
            value = evaluate(expression)
        except CalculatorError:
            continue
        assert isinstance(value, int | float)
        json.dumps(value, allow_nan=False)


# ---------------------------------------------------------------------------- clock


def test_utc_is_the_default_and_readable():
    now = datetime(2026, 3, 29, 0, 30, 5, tzinfo=UTC)
    got = describe_time(now, resolve_timezone(None))
    assert got == {
        "timezone": "UTC",
        "iso": "2026-03-29T00:30:05+00:00",
        "readable": "Sunday, 29 March 2026, 00:30:05 UTC",
        "utc_offset": "+00:00",
        "unix": int(now.timestamp()),
    }


def test_iana_zone_shows_local_time_and_daylight_saving():
    winter = describe_time(
        datetime(2026, 1, 15, 12, 0, tzinfo=UTC), resolve_timezone("Europe/Paris")
    )
    summer = describe_time(
        datetime(2026, 7, 15, 12, 0, tzinfo=UTC), resolve_timezone("Europe/Paris")
    )
    assert winter["iso"] == "2026-01-15T13:00:00+01:00"
    assert winter["readable"].endswith("13:00:00 CET")
    assert summer["iso"] == "2026-07-15T14:00:00+02:00"
    assert summer["utc_offset"] == "+02:00"
    assert summer["timezone"] == "Europe/Paris"


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus_Mons",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/" + "x" * 100,
        "not a zone",
    ],
)
def test_bad_zone_names_give_a_clear_error(name):
    with pytest.raises(ToolError, match="IANA|longer"):
        resolve_timezone(name)


async def test_clock_tool_through_the_registry_uses_the_injected_clock():
    registry = ToolRegistry()
    registry.register(clock_tool(now=lambda: datetime(2030, 1, 1, tzinfo=UTC)))
    outcome = await registry.call("current_time", '{"timezone": "Asia/Tokyo"}')
    assert outcome.success
    assert outcome.result["iso"] == "2030-01-01T09:00:00+09:00"
    bad = await registry.call("current_time", {"timezone": "Nowhere/Land"})
    assert not bad.success
    assert bad.error_code == TOOL_ERROR
    assert "Nowhere/Land" in bad.error


async def test_clock_tool_default_clock_is_now():
    outcome = await default_registry().call("current_time", "")
    assert outcome.success
    assert abs(outcome.result["unix"] - time.time()) < 5


# ---------------------------------------------------------------------------- registry


def test_default_registry_describes_its_tools_in_openai_format():
    registry = default_registry()
    assert registry.names() == ["calculator", "current_time"]
    tools = registry.openai_tools()
    assert [t["type"] for t in tools] == ["function", "function"]
    calc = tools[0]["function"]
    assert calc["name"] == "calculator"
    assert calc["parameters"]["required"] == ["expression"]
    assert set(calc) == {"name", "description", "parameters"}
    json.dumps(tools)  # what goes to the LLM is plain JSON


async def test_calculator_round_trip_through_the_registry():
    outcome = await default_registry().call("calculator", '{"expression": "2+3"}')
    assert outcome.success
    assert outcome.result == {"expression": "2+3", "result": 5}
    assert outcome.error is None


async def test_calculator_error_becomes_an_error_outcome():
    outcome = await default_registry().call("calculator", {"expression": "1/0"})
    assert not outcome.success
    assert outcome.error == "calculator: division by zero"
    assert outcome.error_code == TOOL_ERROR


async def test_unknown_tool_names_the_available_ones():
    outcome = await default_registry().call("rm_rf", "{}")
    assert outcome.error_code == UNKNOWN_TOOL
    assert "calculator" in outcome.error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got array"),
        ('"2+3"', "must be a JSON object, got string"),
        ("{}", "missing required argument 'expression'"),
        ('{"expression": 5}', "'expression' must be string, got number"),
        ('{"expression": null}', "'expression' must be string, got null"),
        ('{"expression": "1", "x": 1}', "unexpected argument 'x'"),
    ],
)
async def test_bad_arguments_are_explained(arguments, message):
    outcome = await default_registry().call("calculator", arguments)
    assert not outcome.success
    assert outcome.error_code == INVALID_ARGUMENTS
    assert message in outcome.error
    assert outcome.error.startswith("invalid arguments for calculator: ")


def test_validation_reports_every_problem_and_knows_json_types():
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "flag": {"type": "boolean"},
            "tags": {"type": "array"},
            "opts": {"type": "object"},
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "maybe": {"type": ["string", "null"]},
        },
        "required": ["n", "x"],
        "additionalProperties": False,
    }
    ok = {"n": 2.0, "x": 1, "flag": False, "tags": [], "opts": {}, "mode": "fast", "maybe": None}
    assert validate_arguments(schema, ok) == []
    bad = {"n": True, "x": "1", "flag": 0, "tags": {}, "opts": [], "mode": "medium", "z": 1}
    problems = validate_arguments(schema, bad)
    assert len(problems) == 7
    assert "argument 'n' must be integer, got boolean" in problems
    assert "argument 'mode' must be one of [\"fast\", \"slow\"], got 'medium'" in problems
    assert validate_arguments(schema, {"n": 1.5, "x": 1}) == [
        "argument 'n' must be integer, got number"
    ]
    assert validate_arguments(schema, {"x": 1}) == ["missing required argument 'n'"]


def _tool(name: str, fn, **kwargs) -> Tool:
    return Tool(name=name, description="test", parameters={"type": "object"}, call=fn, **kwargs)


async def test_a_crashing_tool_becomes_an_error_outcome():
    async def broken(arguments):
        return {}["missing"]

    registry = ToolRegistry()
    registry.register(_tool("broken", broken))
    outcome = await registry.call("broken", None)
    assert not outcome.success
    assert outcome.error_code == TOOL_ERROR
    assert "KeyError" in outcome.error
    assert "'missing'" in outcome.error


async def test_a_tool_error_message_is_passed_on_as_is():
    async def picky(arguments):
        raise ToolError("the index is rebuilding, try again in a minute")

    registry = ToolRegistry()
    registry.register(_tool("picky", picky))
    outcome = await registry.call("picky")
    assert outcome.error == "picky: the index is rebuilding, try again in a minute"


async def test_a_non_json_result_becomes_an_error_outcome():
    async def weird(arguments):
        return {"when": datetime.now(UTC)}

    async def nan(arguments):
        return float("nan")

    registry = ToolRegistry()
    registry.register(_tool("weird", weird))
    registry.register(_tool("nan", nan))
    for name in ("weird", "nan"):
        outcome = await registry.call(name)
        assert not outcome.success
        assert "not JSON" in outcome.error


async def test_a_slow_tool_times_out_in_virtual_time(autojump_clock):
    async def slow(arguments):
        await trio.sleep(3600)

    registry = ToolRegistry(default_timeout=2.0)
    registry.register(_tool("slow", slow))
    registry.register(_tool("slower", slow, timeout=0.5))
    start = trio.current_time()
    outcome = await registry.call("slow")
    assert outcome.error_code == TIMEOUT
    assert outcome.error == "slow timed out after 2 s"
    assert trio.current_time() - start == pytest.approx(2.0)
    outcome = await registry.call("slower")
    assert outcome.error == "slower timed out after 0.5 s"


async def test_outer_cancellation_still_propagates():
    started = trio.Event()

    async def waits(arguments):
        started.set()
        await trio.sleep_forever()

    registry = ToolRegistry()
    registry.register(_tool("waits", waits))
    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await registry.call("waits")
        assert started.is_set()
        assert scope.cancelled_caught


def test_registration_rules():
    async def noop(arguments):
        return None

    registry = ToolRegistry()
    registry.register(_tool("a", noop))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_tool("a", noop))
    registry.register(_tool("a", noop), replace=True)
    with pytest.raises(ValueError, match="must match"):
        registry.register(_tool("bad name!", noop))
    with pytest.raises(ValueError, match="type object"):
        registry.register(Tool(name="b", description="", parameters={}, call=noop))
    assert "a" in registry
    assert len(registry) == 1
    assert registry.get("missing") is None
