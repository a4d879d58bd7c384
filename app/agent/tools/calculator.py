"""`calculator`: arithmetic on untrusted input, without `eval`.

The expression comes from an LLM, which may be repeating what a user (or a web page) told it,
so it is hostile input. It is parsed to a Python AST and walked by a tiny interpreter that
knows numbers, arithmetic operators and a whitelist of math functions; any other node is
refused by name. Parsing to an AST executes nothing.

Safe also means bounded: the event loop runs this inline, so every way to make it slow is
closed before the work is done. The text is short, the tree small and shallow, and `**`
checks the size of its result *before* computing it (`9**9**9` would otherwise take minutes
and gigabytes). Integers larger than a double's range are refused like float overflow.
"""

from __future__ import annotations

import ast
import math
import operator
import warnings
from typing import TYPE_CHECKING, Any, Final

from app.agent.tools import Tool, ToolError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CalculatorError", "MAX_LENGTH", "calculator_tool", "evaluate"]

Number = int | float

MAX_LENGTH: Final = 500  # characters of expression
MAX_NODES: Final = 200  # AST nodes
MAX_DEPTH: Final = 40  # nesting; keeps the interpreter's recursion far from Python's limit
MAX_EXPONENT: Final = 10_000
MAX_BITS: Final = 1024  # integers above 2**1024 are beyond any double: "too large"
MAX_ROUND_DIGITS: Final = 100


class CalculatorError(ToolError):
    """A refusal or an arithmetic error, phrased for whoever wrote the expression."""


def _round(value: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int):
        raise CalculatorError("round: the number of digits must be a whole number")
    if abs(ndigits) > MAX_ROUND_DIGITS:
        # round(5, -10**9) would build 10**(10**9) internally.
        raise CalculatorError(f"round: at most {MAX_ROUND_DIGITS} digits")
    return round(value, ndigits)


# name -> (function, minimum arguments, maximum arguments)
_FUNCTIONS: Final[dict[str, tuple[Callable[..., Number], int, int]]] = {
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}
_CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e}

# Friendly names for nodes people (and models) actually try, so a refusal says what was seen.
_REFUSED: Final[dict[type[ast.AST], str]] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "lambda",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment",
    ast.JoinedStr: "strings",
    ast.List: "lists",
    ast.Tuple: "tuples (did you use a comma instead of a dot?)",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Starred: "unpacking",
    ast.Await: "await",
}
_BINARY_HINTS: Final[dict[type[ast.operator], str]] = {
    ast.BitXor: "'^' is not a power here: use ** (2**3 = 8)",
    ast.MatMult: "'@' is not supported",
}


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or `CalculatorError` saying why not."""
    tree = _parse(expression)
    return _eval(tree.body, 0)


def _parse(expression: str) -> ast.Expression:
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be text")
    text = expression.strip()
    if not text:
        raise CalculatorError("the expression is empty")
    if len(text) > MAX_LENGTH:
        raise CalculatorError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        # Hostile text can make the parser warn (e.g. "'int' object is not callable"); those
        # warnings are about code nobody will run, so keep them out of the logs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not a valid expression ({exc.msg})") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("the expression is too complex") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"the expression has more than {MAX_NODES} parts")
    return tree


def _eval(node: ast.expr, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        return _name(node.id)
    if isinstance(node, ast.UnaryOp):
        return _unary(node, depth)
    if isinstance(node, ast.BinOp):
        return _binary(node, depth)
    if isinstance(node, ast.Call):
        return _call(node, depth)
    what = _REFUSED.get(type(node), type(node).__name__)
    raise CalculatorError(
        f"not allowed: {what}. Use numbers, + - * / // % **, parentheses, "
        f"{', '.join(_FUNCTIONS)}, {', '.join(_CONSTANTS)}"
    )


def _constant(value: Any) -> Number:
    # bool is an int subclass: `True + 1` is not arithmetic anyone meant.
    if isinstance(value, bool) or value is None:
        raise CalculatorError(f"{value} is not a number")
    if isinstance(value, int | float):
        return _bounded(value)
    if isinstance(value, complex):
        raise CalculatorError("complex numbers are not supported")
    raise CalculatorError("only numbers are allowed, not text")


def _name(name: str) -> Number:
    if name in _CONSTANTS:
        return _CONSTANTS[name]
    if name in _FUNCTIONS:
        raise CalculatorError(f"{name} is a function: call it, e.g. {name}(2)")
    known = ", ".join([*_CONSTANTS, *_FUNCTIONS])
    raise CalculatorError(f"unknown name {name[:40]!r} (known: {known})")


def _unary(node: ast.UnaryOp, depth: int) -> Number:
    operand = _eval(node.operand, depth + 1)
    if isinstance(node.op, ast.USub):
        return -operand
    if isinstance(node.op, ast.UAdd):
        return operand
    raise CalculatorError("only unary + and - are allowed")


def _binary(node: ast.BinOp, depth: int) -> Number:
    op = type(node.op)
    if op in _BINARY_HINTS:
        raise CalculatorError(_BINARY_HINTS[op])
    if op not in _OPERATORS:
        raise CalculatorError("only + - * / // % ** are allowed")
    left = _eval(node.left, depth + 1)
    right = _eval(node.right, depth + 1)
    return _arithmetic(_OPERATORS[op], left, right)


def _arithmetic(fn: Callable[[Number, Number], Any], *args: Number) -> Number:
    """Apply an operator or function, mapping Python's arithmetic errors to readable ones."""
    try:
        result = fn(*args)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    if isinstance(result, complex):
        # (-8) ** 0.5 is complex in Python 3 rather than an error.
        raise CalculatorError("the result is not a real number")
    return _bounded(result)


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponents above {MAX_EXPONENT} are not supported")
    # Integer powers are exact, hence unbounded in cost: estimate the result's size from the
    # operands first. bit_length - 1 is a lower bound on log2|base|, so this refuses only
    # results that would certainly be too large.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and (abs(base).bit_length() - 1) * exponent > MAX_BITS
    ):
        raise CalculatorError("the result is too large")
    return base**exponent


_OPERATORS: Final[dict[type[ast.operator], Callable[[Number, Number], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}


def _call(node: ast.Call, depth: int) -> Number:
    available = ", ".join(_FUNCTIONS)
    if not isinstance(node.func, ast.Name):
        raise CalculatorError(f"only these functions can be called: {available}")
    name = node.func.id
    if name not in _FUNCTIONS:
        raise CalculatorError(f"unknown function {name[:40]!r} (available: {available})")
    fn, least, most = _FUNCTIONS[name]
    if node.keywords:
        raise CalculatorError(f"{name}: keyword arguments are not supported")
    if not least <= len(node.args) <= most:
        count = str(least) if least == most else f"{least} or {most}"
        raise CalculatorError(f"{name} takes {count} argument(s), got {len(node.args)}")
    args = [_eval(arg, depth + 1) for arg in node.args]
    try:
        return _arithmetic(fn, *args)
    except (ValueError, TypeError):
        shown = ", ".join(_show(arg) for arg in args)
        raise CalculatorError(f"{name}({shown}) is undefined (outside its domain)") from None


def _show(value: Number) -> str:
    # `:g` on an int beyond a double's range raises, so ints are shown as digits, shortened.
    if isinstance(value, float):
        return f"{value:g}"
    digits = repr(value)
    return digits if len(digits) <= 24 else f"{digits[:12]}...({len(digits)} digits)"


def _bounded(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError("the result is too large")
    return value


def calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description=(
            "Evaluate an arithmetic expression exactly. Supports numbers, + - * / // % ** "
            "and parentheses; sqrt, sin, cos, tan (radians), log (natural, or log(x, base)), "
            "log10, exp, abs, round, floor, ceil; and the constants pi and e."
        ),
        parameters={
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "e.g. (2 + 3) * sqrt(16) / 2",
                    "maxLength": MAX_LENGTH,
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        call=_calculate,
        timeout=5.0,
    )


async def _calculate(arguments: dict[str, Any]) -> dict[str, Any]:
    expression = arguments["expression"]
    return {"expression": expression, "result": evaluate(expression)}
