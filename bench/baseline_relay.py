"""The seeds' own design, the baseline of bench/stream.py (seeds/001, "在 FastAPI 中实现流式 SSE").

One FastAPI app, one SSE route, served by one uvicorn process (uvloop, httptools). It relays
the LLM's stream with the openai client exactly as the seed does: `stream=True`, iterate the
chunk objects, yield one `data: {...}` event per token, a `thinking` event first and a `done`
event last. No database, no Redis, no durability: a client that disconnects loses the answer.

Differences from the seed, each in the baseline's favour:

- one `AsyncOpenAI` client for the process (the seed builds an LLM client per request), with a
  connection pool large enough that the pool is never what limits it;
- the body is JSON (`{"message": ...}`, as agentd's route takes) instead of a query parameter;
- `async with stream:`, so a client that leaves closes the upstream too (stack.md).

Run (bench/stream.py does this)::

    BASELINE_LLM_BASE_URL=http://127.0.0.1:PORT/v1 \
        uvicorn bench.baseline_relay:app --port 8001 --loop uvloop --http httptools
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import httpx2
import openai
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

MODEL = os.environ.get("BASELINE_LLM_MODEL", "scripted")

app = FastAPI()
client = openai.AsyncOpenAI(
    base_url=os.environ.get("BASELINE_LLM_BASE_URL"),
    api_key=os.environ.get("BASELINE_LLM_API_KEY", "x"),
    http_client=openai.DefaultAsyncHttpxClient(
        limits=httpx2.Limits(max_connections=10_000, max_keepalive_connections=10_000),
    ),
)


class ChatBody(BaseModel):
    message: str


@app.get("/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/api/chat/stream")
async def chat_stream(body: ChatBody) -> StreamingResponse:
    """流式 Agent 对话 (the seed's route, relaying through the openai client)."""

    async def generate() -> AsyncIterator[str]:
        yield f"data: {json.dumps({'type': 'thinking'})}\n\n"
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": body.message}], stream=True
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    token = chunk.choices[0].delta.content
                    yield f"data: {json.dumps({'type': 'token', 'content': token})}\n\n"
        yield f"data: {json.dumps({'type': 'done'})}\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream")
