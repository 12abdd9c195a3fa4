"""An OpenAI-compatible HTTP server for one model: base, merged, or 4-bit base + adapter.

Endpoints (the subset of the OpenAI API that text generation needs)::

    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain text continuation, streamed or not
    GET  /v1/models             the one model served
    GET  /v1/models/{id}
    GET  /health                liveness, no authentication

so the official clients work unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}])

Design, in the order a request meets it:

* The standard library's ``ThreadingHTTPServer``: one thread per connection,
  bound to 127.0.0.1 unless asked otherwise.
* Limits checked before any work: request body size (413), JSON shape and
  types (400), model name (404), ``max_tokens`` within ``[1, max_tokens_limit]``
  and prompt plus ``max_tokens`` within the context (400,
  ``context_length_exceeded``). Errors use OpenAI's body,
  ``{"error": {"message", "type", "param", "code"}}``.
* One model, one worker thread: requests wait in a bounded queue (503 when it
  is full) and are generated one after another, so concurrent requests
  cannot corrupt each other and greedy answers do not depend on what else is
  running. A client that disconnects mid-stream cancels its generation.
* Token ids come back from the worker one by one and are turned into text
  here: a partial UTF-8 character is held back, and so is any tail that
  could be the start of a ``stop`` string, which is never sent.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from qlora_guide.deployment.generation import chat_input_ids, generate_ids
from qlora_guide.deployment.loading import load_any
from qlora_guide.errors import QLoRAGuideError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "QLORA_GUIDE_API_KEY"  # where serve finds its API key when none is given
ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens_limit: int = 1024  # largest max_tokens accepted
    default_max_tokens: int = 256  # used when a request gives none (shrunk to fit the context)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    context_length: int | None = None  # prompt + answer tokens; None: the model's own
    max_queue: int = 64  # requests waiting for the model; more get 503
    max_stop: int = 4  # OpenAI allows up to 4 stop strings


# ------------------------------------------------------------------ the worker


@dataclass
class Job:
    """One generation request, as the worker sees it."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)  # ("token", id) ... ("end", None) or ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobStreamer:
    """A ``generate`` streamer that sends each new token id to the job's events as soon as it exists."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.job.events.put(("token", int(token)))

    def end(self) -> None:
        pass


class Engine:
    """Runs the jobs of all requests on the one model, one at a time, in a worker thread."""

    def __init__(self, lm: Any, max_queue: int = 64) -> None:
        self.lm = lm
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.served = 0
        self.thread = threading.Thread(target=self._loop, name="qlora-guide-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry later", type="server_error", code="server_busy") from None

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.events.put(("end", None))
                continue
            self.busy = True
            try:
                self._generate(job)
                job.events.put(("end", None))
            except Exception as err:  # reported to the request; the worker keeps serving
                job.events.put(("error", err))
            finally:
                self.busy = False
                self.served += 1

    def _generate(self, job: Job) -> None:
        import torch

        lm = self.lm
        ids = torch.tensor([job.input_ids], dtype=torch.long)
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        with lm.lock:
            generate_ids(
                lm.model,
                ids,
                max_new_tokens=job.max_new_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                tokenizer=lm.tokenizer,
                stop=job.cancelled,
                seed=seed,
                streamer=JobStreamer(job),
            )


class TextAssembler:
    """Turns generated token ids into text deltas, holding back partial characters and possible stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str], lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """Add one token; return the text that is now safe to send."""
        self.ids.append(token)
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(min(hits))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(len(text) - hold)

    def finish(self) -> str:
        """The text still held back once generation has ended without a stop string."""
        return "" if self.stopped else self._advance(len(self.text))

    def _advance(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


# ------------------------------------------------------------------ request validation


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _field(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """``body[name]`` checked against ``kind`` (int, number, bool, str); ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        words = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string"}[kind]
        raise ApiError(400, f"'{name}' must be {words}, not {_type_name(value)}", param=name, code="invalid_type")
    return value


def _unsupported(body: dict[str, Any], checks: dict[str, Any]) -> None:
    """Refuse options this server does not implement, rather than silently ignoring them."""
    for name, is_default in checks.items():
        if name in body and body[name] is not None and not is_default(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _message_text(content: Any, index: int) -> str:
    """A message's content as text: a string, or an array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", param=f"messages[{index}].content", code="invalid_content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{index}].content must be a string or an array of text parts, not {_type_name(content)}", param=f"messages[{index}].content", code="invalid_type")


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Validate ``messages`` and return them as ``{role, content}`` strings (``developer`` becomes ``system``)."""
    if not isinstance(value, list):
        raise ApiError(400, f"'messages' must be an array of messages, not {_type_name(value)}", param="messages", code="invalid_type")
    if not value:
        raise ApiError(400, "'messages' must not be empty", param="messages", code="invalid_value")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object, not {_type_name(message)}", param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, not {role!r}", param=f"messages[{i}].role", code="invalid_value")
        messages.append({"role": "system" if role == "developer" else role, "content": _message_text(message.get("content"), i)})
    return messages


def parse_stop(value: Any, max_stop: int) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stops) > max_stop:
        raise ApiError(400, f"'stop' has {len(stops)} strings: at most {max_stop} are allowed", param="stop", code="invalid_value")
    return [s for s in stops if s]


# ------------------------------------------------------------------ the application


class App:
    """Everything a request handler needs: the model, its engine, the limits and the served id."""

    def __init__(self, lm: Any, model_id: str, limits: Limits, api_key: str | None = None, verbose: bool = False) -> None:
        self.lm = lm
        self.model_id = model_id
        self.aliases = {model_id, lm.name, lm.source}
        self.limits = limits
        self.context_length = limits.context_length or lm.context_length
        self.api_key = api_key
        self.verbose = verbose
        self.tokenizer_lock = threading.Lock()  # the fast tokenizers are not safe to call from several threads
        self.created = int(time.time())
        self.engine = Engine(lm, limits.max_queue)
        eos = lm.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if lm.tokenizer.eos_token_id is not None:
            self.eos_ids.add(lm.tokenizer.eos_token_id)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "qlora-guide"}

    def check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is None:
            raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be a string, not {_type_name(name)}", param="model", code="invalid_type")
        if name not in self.aliases:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves '{self.model_id}'", param="model", code="model_not_found")

    def max_tokens(self, body: dict[str, Any], prompt_tokens: int) -> int:
        """The request's max_tokens, checked against the limit and the context left after the prompt."""
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        requested = _field(body, name, "int")
        limit, context = self.limits.max_tokens_limit, self.context_length
        if requested is not None:
            if requested < 1:
                raise ApiError(400, f"'{name}' must be at least 1, not {requested}", param=name, code="invalid_value")
            if requested > limit:
                raise ApiError(400, f"'{name}' is {requested}: this server allows at most {limit}", param=name, code="invalid_value")
        tokens = requested if requested is not None else min(self.limits.default_max_tokens, limit, context - prompt_tokens)
        if prompt_tokens + max(tokens, 1) > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + max(tokens, 1)} tokens ({prompt_tokens} in the prompt, {max(tokens, 1)} for the completion). "
                "Please reduce the length of the prompt or the completion.",
                param="messages" if "messages" in body else "prompt",
                code="context_length_exceeded",
            )
        return tokens

    def make_job(self, body: dict[str, Any], input_ids: list[int]) -> tuple[Job, list[str]]:
        """Validate the sampling options shared by both endpoints and build the job."""
        temperature = _field(body, "temperature", "number", 1.0)
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"'temperature' must be between 0 and 2, not {temperature}", param="temperature", code="invalid_value")
        top_p = _field(body, "top_p", "number", 1.0)
        if not 0 < top_p <= 1:
            raise ApiError(400, f"'top_p' must be in (0, 1], not {top_p}", param="top_p", code="invalid_value")
        n = _field(body, "n", "int", 1)
        if n != 1:
            raise ApiError(400, f"'n' must be 1: this server returns one choice, not {n}", param="n", code="invalid_value")
        _field(body, "stream", "bool")
        seed = _field(body, "seed", "int")
        _unsupported(body, {
            "tools": lambda v: v == [],
            "functions": lambda v: v == [],
            "logprobs": lambda v: v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0),
            "top_logprobs": lambda v: v == 0,
            "presence_penalty": lambda v: v == 0,
            "frequency_penalty": lambda v: v == 0,
            "logit_bias": lambda v: v == {},
            "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
            "echo": lambda v: v is False,
            "suffix": lambda v: v == "",
            "best_of": lambda v: v == 1,
        })
        stop = parse_stop(body.get("stop"), self.limits.max_stop)
        max_new = self.max_tokens(body, len(input_ids))
        return Job(input_ids, max_new, float(temperature), float(top_p), seed), stop

    def run(self, job: Job, stop: list[str]) -> Any:
        """Queue the job and yield text deltas; the generator's return value is (finish_reason, tokens)."""
        self.engine.submit(job)
        assembler = TextAssembler(self.lm.tokenizer, stop, self.tokenizer_lock)
        try:
            while True:
                kind, value = job.events.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                if assembler.stopped:
                    continue  # tokens generated before the cancellation reached the worker
                delta = assembler.add(value)
                if assembler.stopped:
                    job.cancelled.set()
                if delta:
                    yield delta
            tail = assembler.finish()
            if tail:
                yield tail
        finally:
            job.cancelled.set()  # the client went away, or we are done: stop generating
        ids = assembler.ids
        if assembler.stopped or (ids and ids[-1] in self.eos_ids):
            reason = "stop"
        elif len(ids) >= job.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        return reason, len(ids)


def _ident(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: routing, body limits, JSON and SSE responses, and errors that never escape."""

    server_version = "qlora-guide"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    # ---- plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.verbose:
            super().log_message(format, *args)

    def send_json(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: ApiError, close: bool = False) -> None:
        self.send_json(error.status, error.body(), close=close)

    def read_json(self) -> dict[str, Any]:
        """The request body as a JSON object, within the size limit."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported: send a Content-Length", code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {length!r}", code="invalid_request") from None
        if size < 0:
            raise ApiError(400, f"invalid Content-Length {length!r}", code="invalid_request")
        limit = self.app.limits.max_body_bytes
        if size > limit:
            raise ApiError(413, f"the request body is {size} bytes: at most {limit} are accepted", code="request_too_large")
        raw = self.rfile.read(size)
        self.body_read = True
        if len(raw) < size:
            raise ApiError(400, "the request body is shorter than its Content-Length", code="invalid_request")
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8 text", code="invalid_json") from None
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, not {_type_name(body)}", code="invalid_json")
        return body

    def check_auth(self) -> None:
        key = self.app.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    def handle_safely(self, action: Any) -> None:
        """Run a route; turn any failure into an error response, and never let it reach the server loop."""
        self.headers_sent = False
        self.body_read = False
        try:
            action()
        except ApiError as err:
            if not self.headers_sent:
                # an unread body must not be parsed as the next request: close the connection instead
                unread = not self.body_read and (
                    self.headers.get("Content-Length", "0") not in ("", "0") or "Transfer-Encoding" in self.headers
                )
                self.send_error_json(err, close=unread or err.code == "invalid_request")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            if not self.headers_sent:
                self.send_error_json(ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error", code="internal_error"), close=True)
            else:
                self.close_connection = True

    # ---- routes

    ROUTES = {"/health": {"GET"}, "/v1/models": {"GET"}, "/v1/chat/completions": {"POST"}, "/v1/completions": {"POST"}}

    def route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        allowed = self.ROUTES.get(path) or ({"GET"} if path.startswith("/v1/models/") else None)
        if allowed is None:
            raise ApiError(404, f"unknown path {path}: see /v1/models, /v1/chat/completions, /v1/completions, /health", code="not_found")
        if method not in allowed:
            raise ApiError(405, f"{method} is not allowed on {path} (use {', '.join(sorted(allowed))})", code="method_not_allowed")
        if path == "/health":
            self.send_json(200, {"status": "ok", "model": self.app.model_id, "waiting": self.app.engine.jobs.qsize(), "busy": self.app.engine.busy})
            return
        self.check_auth()
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.app.model_card()]})
        elif path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            if name not in self.app.aliases:
                raise ApiError(404, f"The model '{name}' does not exist: this server serves '{self.app.model_id}'", param="model", code="model_not_found")
            self.send_json(200, self.app.model_card())
        elif path == "/v1/chat/completions":
            self.completion(self.read_json(), chat=True)
        else:
            self.completion(self.read_json(), chat=False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.handle_safely(lambda: self.route("GET"))

    def do_POST(self) -> None:  # noqa: N802
        self.handle_safely(lambda: self.route("POST"))

    def do_PUT(self) -> None:  # noqa: N802
        self.handle_safely(lambda: self.route("PUT"))

    def do_DELETE(self) -> None:  # noqa: N802
        self.handle_safely(lambda: self.route("DELETE"))

    def do_PATCH(self) -> None:  # noqa: N802
        self.handle_safely(lambda: self.route("PATCH"))

    # ---- completions

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        tokenizer = self.app.lm.tokenizer
        if chat:
            if "messages" not in body:
                raise ApiError(400, "'messages' is required", param="messages", code="missing_required_parameter")
            messages = parse_messages(body["messages"])
            try:
                with self.app.tokenizer_lock:
                    return chat_input_ids(tokenizer, messages)[0].tolist()
            except Exception as err:  # jinja2 raises its own errors for conversations a template refuses
                raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages", code="invalid_value") from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
            with self.app.tokenizer_lock:
                return tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})", param="prompt", code="invalid_value")
            return list(prompt)
        if prompt is None:
            raise ApiError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
        raise ApiError(400, "'prompt' must be a string, an array of one string, or an array of token ids (batches are not supported)", param="prompt", code="invalid_type")

    def completion(self, body: dict[str, Any], chat: bool) -> None:
        app = self.app
        app.check_model(body)
        input_ids = self.prompt_ids(body, chat)
        job, stop = app.make_job(body, input_ids)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = bool((options or {}).get("include_usage")) and stream
        ident = _ident("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        object_name = "chat.completion" if chat else "text_completion"
        base = {"id": ident, "object": object_name + (".chunk" if chat and stream else ""), "created": created, "model": app.model_id}

        def usage(tokens: int) -> dict[str, int]:
            return {"prompt_tokens": len(input_ids), "completion_tokens": tokens, "total_tokens": len(input_ids) + tokens}

        def choice(text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
            if chat and stream:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        pieces = app.run(job, stop)
        if not stream:
            text, result = [], ("stop", 0)
            try:
                while True:
                    text.append(next(pieces))
            except StopIteration as done:
                result = done.value
            reason, tokens = result
            self.send_json(200, {**base, "choices": [choice("".join(text), reason)], "usage": usage(tokens)})
            return

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection closes
        self.end_headers()
        self.headers_sent = True
        self.close_connection = True

        def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            if chat:
                send({**base, "choices": [choice(None, None, first=True)]})
            try:
                while True:
                    send({**base, "choices": [choice(next(pieces), None)]})
            except StopIteration as done:
                reason, tokens = done.value
            send({**base, "choices": [choice(None if chat else "", reason)]})
            if include_usage:
                send({**base, "choices": [], "usage": usage(tokens)})
        except ApiError as err:  # headers are gone: report the error as an event
            send(err.body())
        except (BrokenPipeError, ConnectionResetError):
            pieces.close()  # cancels the generation
            raise
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            send(ApiError(500, f"internal error: {type(err).__name__}: {err}", type="server_error", code="internal_error").body())
        send("[DONE]")


# ------------------------------------------------------------------ starting and stopping


class Server:
    """A running (or ready) server: ``port``, ``url``, ``start()`` in a thread, ``close()``."""

    def __init__(self, httpd: ThreadingHTTPServer, app: App) -> None:
        self.httpd, self.app = httpd, app
        self.host, self.port = httpd.server_address[:2]
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        """Serve in a background thread (for tests and notebooks)."""
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="qlora-guide-http", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=10)
        self.httpd.server_close()
        self.app.engine.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


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
    api_key: str | None = None,
    quantization: Any = "auto",
    verbose: bool = False,
) -> Server:
    """Load the model (or take a loaded :class:`~qlora_guide.deployment.LoadedModel`) and bind a server.

    ``port=0`` picks a free port (read it from ``server.port``). Nothing is
    served until ``start()`` (a background thread) or ``serve_forever()``.
    ``model_name`` is the id clients send as ``model`` (default: the folder
    or model name). ``api_key``, when set, is required as a bearer token.
    """
    if max_tokens_limit < 1 or default_max_tokens < 1 or max_body_bytes < 1 or max_queue < 1:
        raise QLoRAGuideError("max_tokens_limit, default_max_tokens, max_body_bytes and max_queue must be positive")
    if not 0 <= port <= 65535:
        raise QLoRAGuideError(f"port {port} is not a TCP port: use 1 to 65535 (0 picks a free one)")
    if context_length is not None and context_length < 1:
        raise QLoRAGuideError(f"context_length must be a positive number of tokens, not {context_length}")
    lm = load_any(model_ref, quantization=quantization)
    limits = Limits(
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=min(default_max_tokens, max_tokens_limit),
        max_body_bytes=max_body_bytes,
        context_length=min(context_length, lm.context_length) if context_length else None,
        max_queue=max_queue,
    )
    app = App(lm, model_name or lm.name, limits, api_key=api_key, verbose=verbose)
    try:
        httpd = _HTTPServer((host, port), Handler)
    except OSError as err:
        app.engine.close()
        raise QLoRAGuideError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    httpd.app = app  # type: ignore[attr-defined]
    return Server(httpd, app)


def serve(
    model_ref: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens_limit: int = 1024,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    context_length: int | None = None,
    quantization: Any = "auto",
    verbose: bool = True,
) -> None:
    """What ``qlora-guide serve`` runs: load, bind, print the address, serve until Ctrl-C.

    ``api_key`` defaults to ``$QLORA_GUIDE_API_KEY`` (a key on the command
    line shows in the process list; one in the environment does not).
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    server = make_server(
        model_ref, host=host, port=port, model_name=model_name, max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes, context_length=context_length, api_key=api_key,
        quantization=quantization, verbose=verbose,
    )
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, reachable from other machines" + ("" if api_key else " and with no API key"), file=sys.stderr)
    lm = server.app.lm
    print(f"serving '{server.app.model_id}' ({lm.kind}{', 4-bit' if lm.quantized else ''}) at {server.url}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
