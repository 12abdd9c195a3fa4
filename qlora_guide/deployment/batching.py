"""Batching on ``generate``: the jobs that can share a forward pass, padded on the left and generated together.

A CPU (or a GPU) spends about as long on one decoding step for 16 sequences
as for one: the weights are read once per step either way. So the engine
takes the oldest waiting job and every later one that decodes the same way
(:func:`batch_key`), up to ``max_batch``, and runs them through one
``model.generate`` call (:func:`generate_batch`):

* prompts are padded on the left with an attention mask, so each row's
  positions and attention are those of the prompt alone;
* each row stops on its own (:class:`RowsDone`): at its end-of-sequence
  token, its own ``max_new_tokens``, or when its client leaves; its answer
  is complete at that moment, not when the longest row ends;
* rows of a model serving several adapters name theirs in
  ``adapter_names``, so PEFT routes each row through its own LoRA weights in
  the same pass.

In float32, greedy answers are those of each request alone (a test checks
it). In bfloat16 the matrix products of a batch round differently from those
of one row, so a near-tie between two tokens can go the other way: set
``max_batch=1`` where answers must not depend on the traffic.

Jobs whose decoding differs (temperature, ``top_p``, repetition penalty)
go in different batches; a sampled job with a ``seed`` always runs alone, so
that the seed gives the same answer whatever else is running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from qlora_guide.deployment.generation import generate_ids, model_pad_id

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names

if TYPE_CHECKING:
    from qlora_guide.deployment.engine import Job


def batch_key(job: Job, by_adapter: bool = False) -> tuple[Any, ...]:
    """Jobs with equal keys can share one ``generate`` call; a seeded sampled job shares with no one.

    ``by_adapter``: rows of different adapters never share a call (PEFT cannot mix DoRA adapters in one batch).
    """
    if job.temperature > 0 and job.seed is not None:
        return ("alone", id(job))
    key = (job.temperature, job.top_p if job.temperature > 0 else 1.0, job.repetition_penalty)
    return (*key, job.adapter) if by_adapter else key


def mixes_adapters(model: Any) -> bool:
    """Whether rows of different adapters of ``model`` can share a batch: PEFT's ``adapter_names`` refuses DoRA."""
    return not any(getattr(config, "use_dora", False) for config in getattr(model, "peft_config", {}).values())


@contextlib.contextmanager
def using_adapter(model: Any, name: str) -> Iterator[None]:
    """Run ``model`` through one of its adapters (or none, for ``__base__``), then back to the active one."""
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def take_batch(waiting: deque[Job], max_batch: int, by_adapter: bool = False) -> list[Job]:
    """Remove and return the oldest job and the later ones that can join it (at most ``max_batch``), in order."""
    first = waiting.popleft()
    batch, key, kept = [first], batch_key(first, by_adapter), deque()
    while waiting:
        job = waiting.popleft()
        (batch if len(batch) < max_batch and batch_key(job, by_adapter) == key else kept).append(job)
    waiting.extendleft(reversed(kept))
    return batch


class RowsDone:
    """Per-row stopping for ``generate``: a row is done at its end-of-sequence, its token budget, or its client's leaving.

    It is both the stopping criterion (called after each step) and the
    streamer (given each step's tokens), so the two agree on which rows still
    count: once a row is done, ``generate`` pads it and its tokens are ignored.
    """

    def __init__(self, jobs: Sequence[Job], eos_ids: set[int], loop: asyncio.AbstractEventLoop) -> None:
        self.jobs, self.eos_ids, self.loop = list(jobs), eos_ids, loop
        self.counts = [0] * len(self.jobs)
        self.done = [False] * len(self.jobs)
        self.prompt_seen = False

    def finish(self, row: int, event: tuple[str, Any] = ("end", None)) -> None:
        """Row ``row`` generates no more: its job's answer is complete now (or failed, with an ``("error", exc)`` event)."""
        if not self.done[row]:
            self.done[row] = True
            self.loop.call_soon_threadsafe(self.jobs[row].events.put_nowait, event)

    # the streamer side
    def put(self, value: Any) -> None:
        """Called by ``generate``: first with the prompts (skipped), then with each step's tokens, one per row."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            job = self.jobs[row]
            self.counts[row] += 1
            self.loop.call_soon_threadsafe(job.events.put_nowait, ("token", int(token)))
            if int(token) in self.eos_ids or self.counts[row] >= job.max_new_tokens:
                self.finish(row)

    def end(self) -> None:
        """Called by ``generate`` at the end; :func:`generate_batch` ends the rows itself."""

    def fail(self, err: Exception) -> None:
        """Generation failed: every row still running reports ``err`` to its request."""
        for row in range(len(self.jobs)):
            self.finish(row, ("error", err))

    # the stopping-criterion side
    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        for row, job in enumerate(self.jobs):
            if job.cancelled.is_set():
                self.finish(row)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """The prompts padded on the left to one length, and their attention mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def generate_batch(lm: Any, jobs: Sequence[Job], eos_ids: set[int], loop: asyncio.AbstractEventLoop, seed: int) -> None:
    """Generate ``jobs`` together (in the worker thread), streaming each row's tokens to its job as they come.

    Every job ends with ``("end", None)``, or ``("error", exc)`` when generation fails.
    """
    first = jobs[0]
    tokenizer = lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_pad_id(lm.model)
    ids, mask = padded([job.input_ids for job in jobs], pad_id)
    rows = RowsDone(jobs, eos_ids, loop)
    active = getattr(lm.model, "active_adapter", None)
    adapter_names = [job.adapter or active for job in jobs]
    route = contextlib.nullcontext()
    if all(name == active for name in adapter_names):
        adapter_names = None  # every row through the adapter the model runs anyway: PEFT's plain forward
    elif len(set(adapter_names)) == 1 and not mixes_adapters(lm.model):
        route, adapter_names = using_adapter(lm.model, adapter_names[0]), None
    try:
        with lm.lock, route:
            generate_ids(
                lm.model,
                ids,
                attention_mask=mask,
                max_new_tokens=max(job.max_new_tokens for job in jobs),
                temperature=first.temperature,
                top_p=first.top_p,
                repetition_penalty=first.repetition_penalty,
                tokenizer=tokenizer,
                stopping_criteria=[rows],
                seed=first.seed if first.seed is not None else seed,
                streamer=rows,
                adapter_names=adapter_names,
            )
    except Exception as err:  # reported to each request; the worker keeps serving
        rows.fail(err)
    for row in range(len(jobs)):
        rows.finish(row)
