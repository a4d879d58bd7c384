"""PostgreSQL or Redis down: every route answers 503 with Retry-After (or its own answer, such
as /live's 200 or /ready's 503), never a 500 (API.md: errors). In-process, over the fakes of
test_openapi.py, whose database and Redis are down."""

from __future__ import annotations

import pytest

from app.db.pool import DatabaseUnavailable
from app.redis import RedisUnavailable
from tests.web.test_openapi import (  # noqa: F401 - `serve` is a fixture
    check_reply,
    concrete,
    example,
    operations,
    serve,
)


@pytest.mark.parametrize("error", [DatabaseUnavailable("connection refused"),
                                   RedisUnavailable("connection refused")])
async def test_no_route_answers_500_when_a_dependency_is_down(serve, error):  # noqa: F811
    served = serve()
    served.db.error = error
    doc = await served.document()
    answered = {}
    for key, op in operations(doc).items():
        method, path = key.split(" ", 1)
        body = example(doc, op) if "requestBody" in op else None
        query = "q=hello" if path == "/api/search" else ""
        answer = await served.call(method, concrete(path), body, query=query)
        answered[key] = answer.status
        assert answer.status != 500, (key, answer.body[:300])
        if answer.status == 503 and path.startswith(("/api/", "/v1/")):
            assert answer.headers.get("retry-after"), key
            assert answer.json()["error"], key
        check_reply(doc, op, answer)
    assert 503 in answered.values(), answered
