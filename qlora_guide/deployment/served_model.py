"""The served model and its limits: a validated request becomes a :class:`~qlora_guide.deployment.engine.Job`.

A server serves one model, or one base with several adapters: each adapter
is a model of its own in ``/v1/models`` (its folder's name), and so is the
base alone; a request's ``model`` picks its :class:`Route`.

Every limit is checked here, before any generation work: the model name
(404), the prompt (token ids inside the vocabulary, a conversation the chat
template accepts), ``max_tokens`` within ``[1, max_tokens_limit]``, prompt
plus answer within the context (``context_length_exceeded``), and the number
of stop strings.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from qlora_guide.deployment.adapters import BASE
from qlora_guide.deployment.api_errors import ApiError
from qlora_guide.deployment.api_types import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelCard,
)
from qlora_guide.deployment.engine import Answer, Engine, Job
from qlora_guide.deployment.generation import chat_input_ids


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens_limit: int = 1024  # largest max_tokens accepted
    default_max_tokens: int = 256  # used when a request gives none (shrunk to fit the context)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    context_length: int | None = None  # prompt + answer tokens; None: the model's own
    max_queue: int = 64  # requests waiting for the model; more get 503
    max_stop: int = 4  # OpenAI allows up to 4 stop strings
    max_batch: int = 16  # requests generated together; 1 generates them one at a time


@dataclass(frozen=True)
class Route:
    """Where a served model id leads: the PEFT adapter its rows go through (None: the model as loaded)."""

    model_id: str
    adapter: str | None = None
    repetition_penalty: float | None = None


class ServedModel:
    """The model, its engine, the limits and the served id: everything the routes need."""

    def __init__(self, lm: Any, model_id: str, limits: Limits, api_key: str | None = None, verbose: bool = False) -> None:
        self.lm = lm
        self.model_id = model_id
        self.routes = self._routes(lm, model_id)
        self.limits = limits
        self.context_length = limits.context_length or lm.context_length
        self.api_key = api_key
        self.verbose = verbose
        self.tokenizer_lock = threading.Lock()  # the fast tokenizers are not safe to call from several threads
        self.created = int(time.time())
        self.eos_ids = self._eos_ids()
        self.engine = Engine(lm, limits.max_queue, limits.max_batch, self.eos_ids)

    @staticmethod
    def _routes(lm: Any, model_id: str) -> dict[str, Route]:
        """Every name a request may send as ``model``: the served ids first (in ``/v1/models`` order), then aliases.

        One model: ``model_id``, also under its folder name and the reference
        it was loaded from. Adapters: each under its folder name (one alone
        under ``model_id``), then the base alone under its name.
        """
        if not lm.adapters:
            route = Route(model_id)
            return {model_id: route, lm.name: route, lm.source: route}
        adapters = list(lm.adapters.values())
        routes = {}
        for adapter in adapters:
            name = model_id if len(adapters) == 1 else adapter.name
            routes[name] = Route(name, adapter.peft_name, adapter.repetition_penalty)
        base = str(lm.base_model)
        routes.setdefault(base, Route(base, BASE))
        if len(adapters) == 1:  # the folder name and the path given still reach the one adapter
            for alias in (adapters[0].name, lm.source):
                routes.setdefault(alias, routes[model_id])
        return routes

    @property
    def served_ids(self) -> list[str]:
        """The model ids this server lists, each once."""
        return list(dict.fromkeys(route.model_id for route in self.routes.values()))

    def _eos_ids(self) -> set[int]:
        """The token ids that end an answer."""
        eos = self.lm.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.lm.tokenizer.eos_token_id is not None:
            ids.add(self.lm.tokenizer.eos_token_id)
        return ids

    def model_cards(self) -> list[ModelCard]:
        """The entries of ``/v1/models``."""
        return [ModelCard(id=name, created=self.created) for name in self.served_ids]

    def route(self, name: str) -> Route:
        """The route of a model id, or a 404 for a model this server does not serve."""
        route = self.routes.get(name)
        if route is None:
            served = ", ".join(f"'{n}'" for n in self.served_ids)
            raise ApiError(404, f"The model '{name}' does not exist: this server serves {served}", param="model", code="model_not_found")
        return route

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: the conversation through the chat template, or the completion prompt."""
        tokenizer = self.lm.tokenizer
        if isinstance(request, ChatCompletionRequest):
            messages = [m.as_template_message() for m in request.messages]
            try:
                with self.tokenizer_lock:
                    return chat_input_ids(tokenizer, messages)[0].tolist()
            except Exception as err:  # jinja2 raises its own errors for conversations a template refuses
                raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages", code="invalid_value") from None
        assert isinstance(request, CompletionRequest)
        if isinstance(request.prompt, str):
            with self.tokenizer_lock:
                return tokenizer(request.prompt)["input_ids"]
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in request.prompt):
            raise ApiError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})", param="prompt", code="invalid_value")
        return list(request.prompt)

    def max_tokens(self, request: GenerationRequest, prompt_tokens: int, prompt_param: str) -> int:
        """The request's max_tokens, checked against the limit and the context left after the prompt."""
        name, requested = request.token_limit()
        limit, context = self.limits.max_tokens_limit, self.context_length
        if requested is not None and requested > limit:
            raise ApiError(400, f"'{name}' is {requested}: this server allows at most {limit}", param=name, code="invalid_value")
        tokens = requested if requested is not None else min(self.limits.default_max_tokens, limit, context - prompt_tokens)
        if prompt_tokens + max(tokens, 1) > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + max(tokens, 1)} tokens ({prompt_tokens} in the prompt, {max(tokens, 1)} for the "
                "completion). Please reduce the length of the prompt or the completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        return tokens

    def check_stop(self, stop: list[str]) -> None:
        """Refuse more stop strings than allowed."""
        if len(stop) > self.limits.max_stop:
            raise ApiError(400, f"'stop' has {len(stop)} strings: at most {self.limits.max_stop} are allowed", param="stop", code="invalid_value")

    def answer(self, request: GenerationRequest) -> tuple[Answer, int, str]:
        """Check the request, queue its job (503 when the queue is full); return its answer, the prompt's length and the served model id."""
        route = self.route(request.model)
        self.check_stop(request.stop)
        input_ids = self.prompt_ids(request)
        prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        max_new = self.max_tokens(request, len(input_ids), prompt_param)
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        job = Job(input_ids, max_new, float(temperature), float(top_p), request.seed, route.adapter, route.repetition_penalty)
        self.engine.submit(job)
        return Answer(job, self.lm.tokenizer, request.stop, self.eos_ids), len(input_ids), route.model_id
