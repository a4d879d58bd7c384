"""The seeds' relay with the seeds' shutdown handling: the baseline of bench/shutdown.py.

bench/baseline_relay.py is seeds/001's streaming route (FastAPI + uvicorn, the openai client's
`stream=True` chunks relayed as `data:` events: `thinking`, `token`..., `done`). It has no
shutdown handling, because seeds/001 has none. This module adds what seeds/000 ("LLM 流式响应的
优雅中断", "管理所有流式响应") and seeds/003 (health checks) add, and nothing else:

- seeds/000's **shutdown flag** (`shutdown_event`), checked before each token: once it is set,
  the stream yields `{"type": "end", "reason": "server_shutdown", ...}` and stops;
- seeds/000's **`except asyncio.CancelledError`**: a cancelled stream yields
  `{"type": "end", "reason": "cancelled"}` and re-raises;
- seeds/000's **`StreamingResponseManager`**: the active streams are tracked; its `shutdown()`
  sets the flag, waits for the streams (bounded), then cancels what is left;
- that `shutdown()` runs in the app's **lifespan shutdown** ("优雅关闭时 await
  stream_manager.shutdown()"), the only shutdown hook a FastAPI app has. uvicorn runs it only
  after its own graceful wait (`--timeout-graceful-shutdown`, forever by default) and after it has
  cancelled the requests still running: so in practice the flag is set too late for any stream,
  and streams end `cancelled` (notes/stack.md, "Reference behaviour of the seeds' stack");
- seeds/003's **`/ready`**, which always answers 200 `{"status": "ready"}`, changed in one way:
  it answers 503 `{"status": "draining"}` once the shutdown flag is set, as a readiness check
  tied to the seed's flag would. (uvicorn closes idle keep-alive connections at SIGTERM, so a
  client that polls it usually sees its connection closed rather than that 503.)

The relay itself (one `AsyncOpenAI` client for the process, a pool that is never the limit, a
JSON body, `async with stream:`) is baseline_relay's, imported from it, so both benchmarks relay
identically. Run (bench/shutdown.py does this)::

    BASELINE_LLM_BASE_URL=http://127.0.0.1:PORT/v1 \
        uvicorn bench.seed_shutdown_relay:app --port 8001 --loop uvloop --http httptools \
        --timeout-graceful-shutdown 10
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from bench.baseline_relay import MODEL, ChatBody, client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

# seeds/000 cleans up with a total budget (AIAgentResourceManager.cleanup(timeout=...)); the
# stream stage's share is min(30, remaining). By the time uvicorn runs the lifespan shutdown its
# own graceful timeout has already passed, so this rarely matters.
STREAM_SHUTDOWN_TIMEOUT = float(os.environ.get("SEED_STREAM_SHUTDOWN_TIMEOUT", "30"))


class StreamingResponseManager:
    """seeds/000's 流式响应管理器: tracks the active streams; shutdown sets the flag."""

    def __init__(self) -> None:
        self.active_streams: set[asyncio.Task[object]] = set()
        self.shutdown_event = asyncio.Event()

    async def create_stream(self, prompt: str) -> AsyncIterator[str]:
        task = asyncio.current_task()
        if task is not None:
            self.active_streams.add(task)
        try:
            yield f"data: {json.dumps({'type': 'thinking'})}\n\n"
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
            )
            async with stream:
                async for chunk in stream:
                    # 检查关闭信号 (seeds/000)
                    if self.shutdown_event.is_set():
                        yield "data: " + json.dumps({
                            "type": "end", "reason": "server_shutdown",
                            "message": "服务正在重启，请稍后重试",
                        }) + "\n\n"
                        return
                    if chunk.choices and chunk.choices[0].delta.content:
                        token = chunk.choices[0].delta.content
                        yield f"data: {json.dumps({'type': 'token', 'content': token})}\n\n"
            yield f"data: {json.dumps({'type': 'done'})}\n\n"
        except asyncio.CancelledError:
            # 任务被取消 (seeds/000)
            yield "data: " + json.dumps({"type": "end", "reason": "cancelled"}) + "\n\n"
            raise
        finally:
            if task is not None:
                self.active_streams.discard(task)

    async def shutdown(self, timeout: float = 30) -> None:
        """seeds/000: set the flag, wait for the streams, cancel what is left."""
        self.shutdown_event.set()
        if not self.active_streams:
            return
        try:
            await asyncio.wait_for(
                asyncio.gather(*self.active_streams, return_exceptions=True), timeout=timeout
            )
        except TimeoutError:
            for task in self.active_streams:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*self.active_streams, return_exceptions=True)


stream_manager = StreamingResponseManager()


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    # 优雅关闭时 (seeds/000): uvicorn gets here only after its graceful wait.
    await stream_manager.shutdown(STREAM_SHUTDOWN_TIMEOUT)


app = FastAPI(lifespan=lifespan)


@app.get("/ready")
async def ready() -> JSONResponse:
    """seeds/003's 就绪检查, answering 503 once the seeds/000 shutdown flag is set."""
    if stream_manager.shutdown_event.is_set():
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready"})


@app.post("/api/chat/stream")
async def chat_stream(body: ChatBody) -> StreamingResponse:
    """流式 Agent 对话 (seeds/001's route) through seeds/000's stream manager."""
    return StreamingResponse(stream_manager.create_stream(body.message),
                             media_type="text/event-stream")
