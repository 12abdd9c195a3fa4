"""An OpenAI-compatible HTTP server for one model (base, merged, or 4-bit base + adapter), or one base and several adapters.

Endpoints (the subset of the OpenAI API that text generation needs)::

    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain text continuation, streamed or not
    GET  /v1/models             the models served: one, or each adapter and the base
    GET  /v1/models/{id}
    GET  /health                liveness, no authentication

so the official clients work unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}])

Design, in the order a request meets it:

* FastAPI on uvicorn, bound to 127.0.0.1 unless asked otherwise (a warning
  says when the address is reachable from other machines).
* :class:`~qlora_guide.deployment.http_guards.BodyGuard`: a body that is not
  JSON is a 415, one over the size limit a 413, before anything parses it.
* The API key, when set, compared in constant time.
* The body validated as a pydantic model
  (:mod:`~qlora_guide.deployment.api_types`), then the model name and the
  limits (:class:`~qlora_guide.deployment.served_model.ServedModel`). Errors
  use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``
  (:mod:`~qlora_guide.deployment.api_errors`).
* One model, one worker (:class:`~qlora_guide.deployment.engine.Engine`):
  requests wait in a bounded queue (503 when it is full) and are generated
  in batches of up to ``max_batch`` (:mod:`~qlora_guide.deployment.batching`),
  each row through its own adapter when several are served. A client that
  disconnects, streamed or not, cancels its generation within a token or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from qlora_guide.deployment.adapters import load_adapters
from qlora_guide.deployment.api_errors import ApiError, install_error_handlers
from qlora_guide.deployment.api_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    GenerationRequest,
    Health,
    ModelCard,
    ModelList,
    ResponseBase,
    TextChoice,
    TextCompletion,
    Usage,
)
from qlora_guide.deployment.detokenize import TextAssembler
from qlora_guide.deployment.engine import Answer
from qlora_guide.deployment.http_guards import BodyGuard
from qlora_guide.deployment.loading import load_any, model_kind
from qlora_guide.deployment.served_model import Limits, ServedModel
from qlora_guide.errors import QLoRAGuideError

__all__ = ["API_KEY_ENV", "ApiError", "Limits", "Server", "ServedModel", "TextAssembler", "create_app", "is_loopback", "make_server", "serve"]

API_KEY_ENV = "QLORA_GUIDE_API_KEY"  # where serve finds its API key when none is given
DISCONNECT_POLL_S = 0.05  # how often a request checks that its client is still there


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ident(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-...``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def check_api_key(authorization: str | None, key: str | None) -> None:
    """Refuse (401) a request whose ``Authorization: Bearer`` token is not ``key``; constant-time comparison."""
    if not key:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, answer: Answer) -> AsyncIterator[None]:
    """While inside, poll the client; if it has gone, cancel the answer's generation."""

    async def watch() -> None:
        """Set the job's cancel event once the client has disconnected."""
        while not answer.job.cancelled.is_set():
            if await request.is_disconnected():
                answer.job.cancelled.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


# ------------------------------------------------------------------ responses


def whole_response(request: GenerationRequest, answer: Answer, text: str, prompt_tokens: int, model_id: str) -> ResponseBase:
    """The non-streamed response of a finished answer."""
    base = {"created": int(time.time()), "model": model_id, "usage": Usage.of(prompt_tokens, answer.tokens)}
    if isinstance(request, ChatCompletionRequest):
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=answer.finish_reason)
        return ChatCompletion(id=_ident("chatcmpl"), object="chat.completion", choices=[choice], **base)
    return TextCompletion(id=_ident("cmpl"), object="text_completion", choices=[TextChoice(text=text, finish_reason=answer.finish_reason)], **base)


class ChunkMaker:
    """The streamed chunks of one answer: same id, object and creation time for all of them."""

    def __init__(self, request: GenerationRequest, model_id: str) -> None:
        self.chat = isinstance(request, ChatCompletionRequest)
        self.base = {"id": _ident("chatcmpl" if self.chat else "cmpl"), "created": int(time.time()), "model": model_id}

    def first(self) -> ResponseBase | None:
        """The chunk that opens a chat answer (the assistant's role); none for text completions."""
        return self.delta(Delta(role="assistant", content="")) if self.chat else None

    def text(self, text: str) -> ResponseBase:
        """A chunk with the next piece of the answer."""
        return self.delta(Delta(content=text)) if self.chat else self._text(TextChoice(text=text))

    def final(self, reason: str) -> ResponseBase:
        """The chunk that says why the answer ended."""
        if self.chat:
            return ChatCompletionChunk(object="chat.completion.chunk", choices=[ChatChunkChoice(delta=Delta(), finish_reason=reason)], **self.base)
        return self._text(TextChoice(text="", finish_reason=reason))

    def usage(self, usage: Usage) -> ResponseBase:
        """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
        if self.chat:
            return ChatCompletionChunk(object="chat.completion.chunk", choices=[], usage=usage, **self.base)
        return TextCompletion(object="text_completion", choices=[], usage=usage, **self.base)

    def delta(self, delta: Delta) -> ChatCompletionChunk:
        """A chat chunk carrying ``delta``."""
        return ChatCompletionChunk(object="chat.completion.chunk", choices=[ChatChunkChoice(delta=delta)], **self.base)

    def _text(self, choice: TextChoice) -> TextCompletion:
        """A text completion chunk carrying ``choice``."""
        return TextCompletion(object="text_completion", choices=[choice], **self.base)


def sse(data: str) -> bytes:
    """One server-sent event: ``data: ...`` and a blank line."""
    return f"data: {data}\n\n".encode()


async def event_stream(request: GenerationRequest, answer: Answer, prompt_tokens: int, http: Request, model_id: str) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer, ending with ``data: [DONE]``."""
    chunks = ChunkMaker(request, model_id)
    async with cancel_on_disconnect(http, answer):
        try:
            first = chunks.first()
            if first is not None:
                yield sse(first.to_json())
            async for delta in answer.deltas():
                yield sse(chunks.text(delta).to_json())
            yield sse(chunks.final(answer.finish_reason).to_json())
            if request.include_usage:
                yield sse(chunks.usage(Usage.of(prompt_tokens, answer.tokens)).to_json())
        except ApiError as err:  # the headers are gone: report the error as an event
            yield sse(json.dumps(err.body(), ensure_ascii=False))
        except Exception as err:
            logging.getLogger("qlora_guide.serving").exception("generation failed")
            failure = ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error", code="internal_error")
            yield sse(json.dumps(failure.body(), ensure_ascii=False))
    yield sse("[DONE]")


async def complete(served: ServedModel, request: GenerationRequest, http: Request) -> Response:
    """Answer a completion request, whole or streamed; every limit is checked before the job is queued."""
    answer, prompt_tokens, model_id = served.answer(request)
    if request.stream:
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}
        return StreamingResponse(event_stream(request, answer, prompt_tokens, http, model_id), headers=headers)
    async with cancel_on_disconnect(http, answer):
        text = await answer.text()
    body = whole_response(request, answer, text, prompt_tokens, model_id)
    return Response(body.to_json(), media_type="application/json")


# ------------------------------------------------------------------ the application


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI application that serves ``served``: routes, error bodies, body guard, engine lifetime."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Start the engine with the server, stop it with the server."""
        await served.engine.start()
        try:
            yield
        finally:
            await served.engine.close()

    def authorized(http: Request) -> None:
        """The dependency of every ``/v1`` route: the API key, when one is set."""
        check_api_key(http.headers.get("authorization"), served.api_key)

    app = FastAPI(title="qlora-guide", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_body_bytes=served.limits.max_body_bytes)
    v1 = [Depends(authorized)]

    @app.get("/health")
    async def health() -> Health:
        """Liveness, without authentication."""
        return Health(model=served.model_id, waiting=served.engine.waiting, busy=served.engine.busy)

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> ModelList:
        """The models served."""
        return ModelList(data=served.model_cards())

    @app.get("/v1/models/{name:path}", dependencies=v1)
    async def get_model(name: str) -> ModelCard:
        """A served model, by any of its names."""
        return next(card for card in served.model_cards() if card.id == served.route(name).model_id)

    @app.post("/v1/chat/completions", dependencies=v1, response_model=None)
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        """Chat: an answer to a conversation."""
        return await complete(served, body, http)

    @app.post("/v1/completions", dependencies=v1, response_model=None)
    async def completions(body: CompletionRequest, http: Request) -> Response:
        """Plain text continuation of a prompt."""
        return await complete(served, body, http)

    return app


# ------------------------------------------------------------------ starting and stopping


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (IPv4 or IPv6), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise QLoRAGuideError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise QLoRAGuideError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class Server:
    """A ready server: ``host``, ``port``, ``url``; ``start()`` serves in a thread, ``serve_forever()`` here, ``close()``."""

    def __init__(self, sock: socket.socket, served: ServedModel, verbose: bool = False) -> None:
        self.sock, self.app = sock, served
        self.host, self.port = sock.getsockname()[:2]
        self.asgi = create_app(served)
        config = uvicorn.Config(self.asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=60)
        if verbose:  # one line per request, on stderr like the server's other messages
            access = logging.getLogger("uvicorn.access")
            access.setLevel(logging.INFO)
            for handler in access.handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.setStream(sys.stderr)
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL of the API, for ``OpenAI(base_url=...)``."""
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        """Serve in a background thread (for tests and notebooks); return once the server answers."""
        self.thread = threading.Thread(target=self.serve_forever, name="qlora-guide-http", daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            if not self.thread.is_alive():
                raise QLoRAGuideError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self

    def serve_forever(self) -> None:
        """Serve until :meth:`close` (or Ctrl-C in the main thread)."""
        self.uvicorn.run(sockets=[self.sock])

    def close(self) -> None:
        """Stop serving, end the running generation, release the port."""
        self.app.engine.cancel_all_threadsafe()
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_served(model_ref: Any, quantization: Any = "auto") -> Any:
    """The model to serve: a :class:`~qlora_guide.deployment.LoadedModel` as given, one model reference, or several adapter folders on their one base."""
    refs = list(model_ref) if isinstance(model_ref, (list, tuple)) else [model_ref]
    if len(refs) == 1 and (not isinstance(refs[0], (str, os.PathLike)) or model_kind(refs[0]) != "adapter"):
        return load_any(refs[0], quantization=quantization)
    for ref in refs:
        if model_kind(ref) != "adapter":
            raise QLoRAGuideError(f"{ref} is not an adapter folder: several models are served only as adapters of one base")
    return load_adapters(refs, quantization=quantization)


def make_server(
    model_ref: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    max_tokens_limit: int = 1024,
    default_max_tokens: int = 256,
    max_body_bytes: int = 1 << 20,
    context_length: int | None = None,
    max_queue: int = 64,
    max_batch: int = 16,
    api_key: str | None = None,
    quantization: Any = "auto",
    verbose: bool = False,
) -> Server:
    """Load the model (or take a loaded :class:`~qlora_guide.deployment.LoadedModel`) and bind a server.

    ``model_ref`` is one model reference, or a list of adapter folders
    trained on one base. Adapters are served each under its folder's name
    (one alone under ``model_name`` if given), and the base alone under its
    own name, all from one copy of the base.
    ``port=0`` picks a free port (read it from ``server.port``). Nothing is
    served until ``start()`` (a background thread) or ``serve_forever()``.
    ``model_name`` is the id clients send as ``model`` (default: the folder
    or model name). ``api_key``, when set, is required as a bearer token.
    ``max_batch`` requests are generated together at most (1: one at a time).
    """
    if min(max_tokens_limit, default_max_tokens, max_body_bytes, max_queue, max_batch) < 1:
        raise QLoRAGuideError("max_tokens_limit, default_max_tokens, max_body_bytes, max_queue and max_batch must be positive")
    if not 0 <= port <= 65535:
        raise QLoRAGuideError(f"port {port} is not a TCP port: use 1 to 65535 (0 picks a free one)")
    if context_length is not None and context_length < 1:
        raise QLoRAGuideError(f"context_length must be a positive number of tokens, not {context_length}")
    if isinstance(model_ref, (list, tuple)) and len(model_ref) > 1 and model_name:
        raise QLoRAGuideError("model_name names one served model: several adapters are served under their folders' names")
    lm = load_served(model_ref, quantization=quantization)
    limits = Limits(
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        max_body_bytes=max_body_bytes,
        context_length=min(context_length, lm.context_length) if context_length else None,
        max_queue=max_queue,
        max_batch=max_batch,
    )
    served = ServedModel(lm, model_name or lm.name, limits, api_key=api_key, verbose=verbose)
    return Server(bind(host, port), served, verbose=verbose)


def serve(
    model_ref: str | tuple[str, ...],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens_limit: int = 1024,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    context_length: int | None = None,
    max_batch: int = 16,
    quantization: Any = "auto",
    verbose: bool = True,
) -> None:
    """What ``qlora-guide serve`` runs: load, bind, print the address, serve until Ctrl-C.

    Several adapter folders (``qlora-guide serve runs/a runs/b``) are served
    on one copy of their base, each under its folder's name.
    ``api_key`` defaults to ``$QLORA_GUIDE_API_KEY`` (a key on the command
    line shows in the process list; one in the environment does not).
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    server = make_server(
        model_ref, host=host, port=port, model_name=model_name, max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes, context_length=context_length, max_batch=max_batch, api_key=api_key,
        quantization=quantization, verbose=verbose,
    )
    if not (is_loopback(host) and is_loopback(str(server.host))):
        print(f"warning: listening on {host}, reachable from other machines" + ("" if api_key else " and with no API key"), file=sys.stderr)
    lm = server.app.lm
    names = ", ".join(f"'{name}'" for name in server.app.served_ids)
    print(f"serving {names} ({lm.kind}{', 4-bit' if lm.quantized else ''}) at {server.url}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
