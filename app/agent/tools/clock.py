"""`current_time`: the date and time, in UTC or any IANA time zone.

Models have no clock and a training cut-off, so "what day is it" must come from a tool. The
answer carries both ISO-8601 (for the model to compute with) and a readable form (for it to
repeat), plus the zone's abbreviation and UTC offset so daylight saving is visible.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.agent.tools import Tool, ToolError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["clock_tool", "describe_time", "resolve_timezone"]

MAX_ZONE_NAME = 64  # the longest IANA names are ~30 characters


def resolve_timezone(name: str | None) -> tzinfo:
    """The zone called `name`; UTC when none is given. `ToolError` for an unknown name."""
    if name is None or not name.strip() or name.strip().upper() in ("UTC", "Z"):
        return UTC
    name = name.strip()
    if len(name) > MAX_ZONE_NAME:
        raise ToolError(f"time zone name longer than {MAX_ZONE_NAME} characters")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: names that are not relative paths ("/etc/passwd", "../x"); zoneinfo
        # refuses those itself, and they get the same answer as any other unknown name.
        raise ToolError(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris', "
            "'America/New_York' or 'UTC'"
        ) from None


def describe_time(now: datetime, zone: tzinfo) -> dict[str, Any]:
    """`now` (an aware datetime) as seen in `zone`: the tool's whole answer, pure."""
    local = now.astimezone(zone)
    offset = local.strftime("%z")
    return {
        "timezone": "UTC" if zone is UTC else str(zone),
        "iso": local.isoformat(timespec="seconds"),
        "readable": local.strftime("%A, %d %B %Y, %H:%M:%S ") + (local.tzname() or offset),
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
        "unix": int(local.timestamp()),
    }


def clock_tool(now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Tool:
    """The `current_time` tool. `now` is injectable so tests can fix the instant."""

    async def current_time(arguments: dict[str, Any]) -> dict[str, Any]:
        return describe_time(now(), resolve_timezone(arguments.get("timezone")))

    return Tool(
        name="current_time",
        description=(
            "The current date and time. Optionally in a time zone given by its IANA name "
            "(e.g. 'Europe/Paris'); UTC by default."
        ),
        parameters={
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "description": "IANA time zone name, e.g. 'Asia/Tokyo'. Default: UTC.",
                }
            },
            "additionalProperties": False,
        },
        call=current_time,
        timeout=5.0,
    )
