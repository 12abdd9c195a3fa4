"""The one worker that owns the model: requests become jobs in a bounded queue, generated in batches.

* :class:`Engine` keeps the waiting :class:`Job` objects in order (a full
  queue is a 503), takes the next batch of jobs that decode alike
  (:func:`~qlora_guide.deployment.batching.take_batch`, at most
  ``max_batch``), and generates it with one ``generate`` call
  (:func:`~qlora_guide.deployment.batching.generate_batch`) in its single
  worker thread, so that concurrent requests share the model's forward
  passes but never its state. Jobs that arrive meanwhile form the next batch.
* Token ids come back to the event loop one by one, as ``("token", id)``
  events, then ``("end", None)`` or ``("error", exc)``; :class:`Answer` turns
  them into text deltas.
* A job whose ``cancelled`` event is set stops at the next token, or is
  skipped if still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qlora_guide.deployment.api_errors import ApiError
from qlora_guide.deployment.batching import generate_batch, mixes_adapters, take_batch
from qlora_guide.deployment.detokenize import TextAssembler


@dataclass
class Job:
    """One generation request, as the worker sees it."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None  # the PEFT adapter of this request, on a model serving several
    repetition_penalty: float | None = None  # None: the model's generation config
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("token", id) ... ("end", None) or ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs the jobs of all requests on the one model, in batches, in one worker thread."""

    def __init__(self, lm: Any, max_queue: int = 64, max_batch: int = 16, eos_ids: set[int] | None = None) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.eos_ids = eos_ids or set()
        self.queue: deque[Job] = deque()
        self.arrived: asyncio.Event | None = None
        self.running: list[Job] = []
        self.batches: list[int] = []  # the size of each batch, in the order they started
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlora-guide-engine")
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """How many jobs wait for the model."""
        return len(self.queue)

    @property
    def busy(self) -> bool:
        """Whether a batch is being generated."""
        return bool(self.running)

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.arrived = asyncio.Event()
        self.worker = asyncio.create_task(self._loop(), name="qlora-guide-engine")

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 503 when the queue is full."""
        assert self.arrived is not None, "the engine is not started"
        if len(self.queue) >= self.max_queue:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry later", type="server_error", code="server_busy")
        self.queue.append(job)
        self.arrived.set()

    def cancel_all_threadsafe(self) -> None:
        """From any thread: cancel the running jobs and every waiting one (at shutdown)."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                self.loop.call_soon_threadsafe(self._cancel_all)

    def _cancel_all(self) -> None:
        """Cancel the running jobs and every waiting one (on the event loop)."""
        for job in [*self.running, *self.queue]:
            job.cancelled.set()

    async def close(self) -> None:
        """Stop the running jobs and the worker; waiting jobs end without an answer."""
        self._cancel_all()
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while self.queue:
            self.queue.popleft().events.put_nowait(("end", None))
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    async def _next_batch(self) -> list[Job]:
        """Wait for jobs; return the next batch, leaving out (and ending) those whose clients left while waiting."""
        assert self.arrived is not None
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            batch = take_batch(self.queue, self.max_batch, by_adapter=not mixes_adapters(self.lm.model))
            for job in batch:
                if job.cancelled.is_set():
                    job.events.put_nowait(("end", None))
            batch = [job for job in batch if not job.cancelled.is_set()]
            if batch:
                return batch

    async def _loop(self) -> None:
        """Take the next batch and generate it in the worker thread, for ever."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.running = batch
            self.batches.append(len(batch))
            try:
                await loop.run_in_executor(self.executor, generate_batch, self.lm, batch, self.eos_ids, loop, secrets.randbits(63))
            except asyncio.CancelledError:
                for job in batch:
                    job.cancelled.set()
                    job.events.put_nowait(("end", None))
                raise
            finally:
                self.running = []


class Answer:
    """What a request sees of its job: text deltas as they come, then ``finish_reason`` and ``tokens``."""

    def __init__(self, job: Job, tokenizer: Any, stop: list[str], eos_ids: set[int]) -> None:
        self.job = job
        self.assembler = TextAssembler(tokenizer, stop)
        self.eos_ids = eos_ids
        self.finish_reason = "stop"
        self.tokens = 0

    async def deltas(self) -> AsyncIterator[str]:
        """Yield the answer's text deltas; leaving early (a client gone) cancels the generation."""
        job, assembler = self.job, self.assembler
        try:
            while True:
                kind, value = await job.events.get()
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
        self._conclude()

    async def text(self) -> str:
        """The whole answer."""
        return "".join([delta async for delta in self.deltas()])

    def _conclude(self) -> None:
        """Set ``finish_reason`` (``stop`` or ``length``) and ``tokens`` once generation has ended."""
        ids = self.assembler.ids
        self.tokens = len(ids)
        ended = self.assembler.stopped or (ids and ids[-1] in self.eos_ids)
        self.finish_reason = "length" if not ended and len(ids) >= self.job.max_new_tokens else "stop"
