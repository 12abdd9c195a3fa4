"""Generation: one ``generate`` call for everything that generates, streamed answers, and the chat loop.

:func:`generate_ids` is the one place ``model.generate`` is called: the
command line (:func:`generate`, :func:`chat`), the server, the merge parity
checks and the evaluation all decode through it, so greedy decoding, sampling,
padding and the run's generation settings are the same everywhere.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from qlora_guide.config import QuantizationConfig
from qlora_guide.deployment.loading import AUTO, LoadedModel, load_any
from qlora_guide.errors import QLoRAGuideError


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """Token ids (1 x T tensor) of a conversation, ready for the assistant's answer.

    Models without a chat template get the last user message as plain text.
    """
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(messages[-1]["content"])["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy for temperature 0, else sampling."""
    if temperature < 0:
        raise QLoRAGuideError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    if not 0 < top_p <= 1:
        raise QLoRAGuideError(f"top_p must be in (0, 1], not {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def model_pad_id(model: Any) -> int | None:
    """The padding id of a model without its tokenizer: its generation config's pad id, else its (first) EOS id."""
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) else eos
    return pad


class StopWhenSet:
    """A stopping criterion for ``generate``: every sequence ends at the next token once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token exists (``first``, a ``perf_counter`` time)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def generate_ids(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tokenizer: Any = None,
    min_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
    streamer: Any = None,
    stopping_criteria: list[Any] | None = None,
    adapter_names: list[str] | None = None,
) -> Any:
    """Continue ``input_ids`` (batch x T) with ``model.generate``; return only the new token ids (batch x new).

    * ``temperature`` 0 decodes greedily, above 0 it samples with ``top_p``
      (:func:`sampling_kwargs`); when sampling, ``seed`` seeds torch first.
    * Padding uses the tokenizer's pad id, else :func:`model_pad_id`.
    * ``attention_mask`` defaults to all ones (unpadded prompts); a batch
      padded on the left passes its own.
    * ``repetition_penalty=None`` keeps the model's generation config, where
      a run's recipe puts it (see :func:`~qlora_guide.deployment.loading.apply_run_generation_settings`).
    * ``min_new_tokens`` forbids the end of sequence before that many tokens.
    * ``stop``: generation ends at the next token once this event is set.
    * ``streamer`` receives the prompt, then every new token, as transformers' streamers do.
    * ``stopping_criteria``: more of transformers' stopping criteria (one
      may return a bool per row, to end rows one by one).
    * ``adapter_names``: on a PEFT model holding several adapters, the
      adapter of each row (``"__base__"`` for none), all in one pass.

    The inputs are moved to the model's device; no gradients are recorded.
    """
    import torch

    options = sampling_kwargs(temperature, top_p)
    if repetition_penalty is not None:
        options["repetition_penalty"] = repetition_penalty
    if min_new_tokens is not None:
        options["min_new_tokens"] = min_new_tokens
    criteria = [StopWhenSet(stop)] if stop is not None else []
    criteria += stopping_criteria or []
    if criteria:
        from transformers import StoppingCriteriaList

        options["stopping_criteria"] = StoppingCriteriaList(criteria)
    if adapter_names is not None:
        options["adapter_names"] = adapter_names
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else model_pad_id(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if options["do_sample"] and seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            streamer=streamer,
            **options,
        )
    return out[:, input_ids.shape[1] :]


def greedy_ids(model: Any, input_ids: Any, max_new_tokens: int) -> list[int]:
    """The token ids of a greedy continuation of one prompt (no stopping before max_new_tokens but EOS)."""
    return generate_ids(model, input_ids, max_new_tokens=max_new_tokens)[0].tolist()


def stream_generate(
    lm: LoadedModel,
    input_ids: Any,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    out: IO[str] | None = None,
) -> str:
    """Generate an answer in a background thread and write its text to ``out`` as it comes.

    transformers' ``TextIteratorStreamer`` turns token ids into printable text
    (it waits for whole words and whole UTF-8 characters). The model's lock is
    held for the whole generation, so two callers never interleave.
    """
    from transformers import TextIteratorStreamer

    if max_new_tokens <= 0:
        raise QLoRAGuideError(f"max_new_tokens must be positive, not {max_new_tokens}")
    sampling_kwargs(temperature, top_p)  # raises on bad values here, not in the worker thread
    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate_ids(lm.model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         tokenizer=lm.tokenizer, streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)
            streamer.end()

    pieces = []
    with lm.lock:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            pieces.append(piece)
            if out is not None:
                out.write(piece)
                out.flush()
        worker.join()
    if failure:
        raise failure[0]
    return "".join(pieces)


def generate(
    model_ref: Any,
    prompt: str,
    max_new_tokens: int = 256,
    stream: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    quantization: QuantizationConfig | None | str = AUTO,
    out: IO[str] | None = None,
) -> str:
    """Answer one user message with a base, merged or adapter model; stream it to ``out`` (stdout).

    Returns the answer's text. ``stream=False`` prints nothing and only returns it.
    Bad arguments are refused before any model is loaded.
    """
    if not prompt.strip():
        raise QLoRAGuideError("the prompt is empty: give the message to answer ('-' reads it from standard input)")
    if max_new_tokens < 1:
        raise QLoRAGuideError(f"max_new_tokens must be a positive number of tokens, not {max_new_tokens}")
    sampling_kwargs(temperature, top_p)  # raises on bad values, before the load
    lm = load_any(model_ref, quantization=quantization)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = chat_input_ids(lm.tokenizer, messages)
    _check_fits(lm, ids.shape[1], max_new_tokens)
    out = (out or sys.stdout) if stream else None
    text = stream_generate(lm, ids, max_new_tokens, temperature, top_p, out=out)
    if out is not None:
        out.write("\n")
        out.flush()
    return text


def _check_fits(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens + max_new_tokens > lm.context_length:
        raise QLoRAGuideError(
            f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"model's context of {lm.context_length} tokens"
        )


CHAT_HELP = "Type a message and press Enter. /reset forgets the conversation, /exit (or Ctrl-D) quits."


def chat(
    model_ref: Any,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    quantization: QuantizationConfig | None | str = AUTO,
    input: IO[str] | None = None,
    output: IO[str] | None = None,
) -> list[dict[str, str]]:
    """An interactive chat on stdin/stdout that keeps the conversation; returns the final history.

    Commands: ``/reset`` clears the history, ``/exit`` (or ``/quit``, or end of
    input) leaves. When the conversation no longer fits the context, the
    oldest exchanges are dropped (the system prompt stays) and a note says so.
    """
    input = input or sys.stdin
    output = output or sys.stdout
    lm = load_any(model_ref, quantization=quantization)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict[str, str]] = []
    output.write(f"{lm.name} ({lm.kind}{', 4-bit' if lm.quantized else ''}). {CHAT_HELP}\n")
    while True:
        output.write("> ")
        output.flush()
        line = input.readline()
        if not line:
            output.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            output.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            output.write(f"unknown command {text}. {CHAT_HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        ids = chat_input_ids(lm.tokenizer, system + history)
        while ids.shape[1] + max_new_tokens > lm.context_length and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[-1:]
            output.write("(oldest messages dropped to fit the context)\n")
            ids = chat_input_ids(lm.tokenizer, system + history)
        if ids.shape[1] + max_new_tokens > lm.context_length:
            history.pop()
            output.write("(message too long for the model's context)\n")
            continue
        answer = stream_generate(lm, ids, max_new_tokens, temperature, top_p, out=output)
        output.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})
    return system + history
