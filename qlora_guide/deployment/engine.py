"""The one worker that owns the model: requests become jobs in a bounded asyncio queue, generated in turn.

* :class:`Engine` takes :class:`Job` objects from an ``asyncio.Queue`` whose
  size is the queue limit (a full queue is a 503) and runs each through the
  package's one ``generate`` call
  (:func:`~qlora_guide.deployment.generation.generate_ids`) in its single
  worker thread, so concurrent requests cannot corrupt each other and greedy
  answers do not depend on what else is running. A batching scheduler would
  replace :meth:`Engine._loop` and keep the same jobs.
* Token ids come back to the event loop one by one (:class:`JobStreamer`);
  :class:`Answer` turns them into text deltas.
* A job whose ``cancelled`` event is set stops at the next token (the
  generation's stopping criteria poll it) or is skipped if still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qlora_guide.deployment.api_errors import ApiError
from qlora_guide.deployment.detokenize import TextAssembler
from qlora_guide.deployment.generation import generate_ids


@dataclass
class Job:
    """One generation request, as the worker sees it."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("token", id) ... ("end", None) or ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobStreamer:
    """A ``generate`` streamer that hands each new token id to the job's events, on the event loop."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job, self.loop = job, loop
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by ``generate``: first with the prompt (skipped), then with each new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.job.events.put_nowait, ("token", int(token)))

    def end(self) -> None:
        """Called by ``generate`` at the end; the engine reports the end itself."""


class Engine:
    """Runs the jobs of all requests on the one model, one at a time, in one worker thread."""

    def __init__(self, lm: Any, max_queue: int = 64) -> None:
        self.lm = lm
        self.max_queue = max_queue
        self.jobs: asyncio.Queue | None = None
        self.busy = False
        self.served = 0
        self.current: Job | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlora-guide-engine")
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """How many jobs wait for the model."""
        return self.jobs.qsize() if self.jobs is not None else 0

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        self.loop = asyncio.get_running_loop()
        self.jobs = asyncio.Queue(maxsize=self.max_queue)
        self.worker = asyncio.create_task(self._loop(), name="qlora-guide-engine")

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 503 when the queue is full."""
        assert self.jobs is not None, "the engine is not started"
        try:
            self.jobs.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry later", type="server_error", code="server_busy") from None

    def cancel_all_threadsafe(self) -> None:
        """From any thread: cancel the running job and every waiting one (at shutdown)."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                self.loop.call_soon_threadsafe(self._cancel_all)

    def _cancel_all(self) -> None:
        """Cancel the running job and every waiting one (on the event loop)."""
        if self.current is not None:
            self.current.cancelled.set()
        for job in list(getattr(self.jobs, "_queue", ())):
            job.cancelled.set()

    async def close(self) -> None:
        """Stop the running job and the worker; waiting jobs end without an answer."""
        if self.current is not None:
            self.current.cancelled.set()
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while self.jobs is not None and not self.jobs.empty():
            job = self.jobs.get_nowait()
            job.cancelled.set()
            job.events.put_nowait(("end", None))
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    async def _loop(self) -> None:
        """Take jobs in turn and generate each in the worker thread."""
        assert self.jobs is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self.jobs.get()
            if job.cancelled.is_set():  # its client left while it waited
                job.events.put_nowait(("end", None))
                continue
            self.busy, self.current = True, job
            try:
                await loop.run_in_executor(self.executor, self._generate, job, loop)
                job.events.put_nowait(("end", None))
            except asyncio.CancelledError:
                job.cancelled.set()
                job.events.put_nowait(("end", None))
                raise
            except Exception as err:  # reported to the request; the worker keeps serving
                job.events.put_nowait(("error", err))
            finally:
                self.busy, self.current = False, None
                self.served += 1

    def _generate(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Generate one job (in the worker thread), streaming its tokens back to ``loop``."""
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
                streamer=JobStreamer(job, loop),
            )


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
        if self.assembler.stopped or (ids and ids[-1] in self.eos_ids):
            self.finish_reason = "stop"
        elif len(ids) >= self.job.max_new_tokens:
            self.finish_reason = "length"
        else:
            self.finish_reason = "stop"
