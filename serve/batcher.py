"""Dynamic batching of requests that can share one model call.

Requests arrive as `Job`s with a key (their sampling settings) and an image count. One runner
thread takes, in arrival order, the oldest waiting job and every later job of the same key that
fits in `max_images`, and runs them as one call. A group waits up to `wait_s` from its oldest
job's arrival for more jobs unless it is full already, so a lone request pays at most `wait_s`.
Jobs of another key wait at most for the group in front of them: groups leave in the order of
their oldest job. A job whose caller went away (its awaiting task cancelled) or whose deadline
passed is dropped before it runs. Ray Serve's `@serve.batch` batches by request count and cannot
group by settings or count images, hence this small scheduler on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


class DeadlineExceeded(TimeoutError):
    """A job whose deadline passed before it could run."""


@dataclass(eq=False)
class Job:
    """One request's share of a batch: `payload` is what the runner needs for it."""

    key: Hashable
    images: int
    payload: Any
    deadline: float  # time.monotonic() after which the job is not worth running
    batchable: bool = True  # False: runs alone, without waiting for company
    arrival: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None
    alone: bool = False  # arrived at an idle replica: runs without waiting for others


@dataclass(frozen=True)
class BatchInfo:
    """What a job learns about the call it ran in."""

    images: int  # images of the whole call
    jobs: int
    queued_s: float  # this job's wait before its call started
    run_s: float  # the call's seconds


class Batcher:
    """Groups jobs by key into calls of at most `max_images` images, one call at a time.

    :param run: `run(key, payloads) -> results` (one per payload), called in the runner thread.
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], max_images: int, wait_s: float,
                 on_batch: Callable[[BatchInfo, int], None] | None = None) -> None:
        self.run, self.max_images, self.wait_s, self.on_batch = run, max_images, wait_s, on_batch
        self.pending: list[Job] = []
        self._last_arrival = float("-inf")
        self.running = False  # a call is on the runner thread
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._runner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="unclip-runner")

    async def submit(self, job: Job) -> tuple[Any, BatchInfo]:
        """Queue `job` and wait for its result; cancelling the caller drops the job if not started."""
        loop = asyncio.get_running_loop()
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._schedule())
        job.future = loop.create_future()
        # a request into an idle replica (nothing else arrived within the wait) does not wait for company
        job.alone = not self.pending and job.arrival - self._last_arrival > self.wait_s
        self._last_arrival = job.arrival
        self.pending.append(job)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self.pending:
                self.pending.remove(job)  # not started: nothing runs for a caller that left
            raise

    def _next_group(self, now: float) -> tuple[list[Job], float | None]:
        """The group to run now, or ([], seconds to wait) while the oldest job's group may still grow."""
        self.pending = [j for j in self.pending if not j.future.done()]
        for job in [j for j in self.pending if j.deadline <= now]:
            self.pending.remove(job)
            job.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
        if not self.pending:
            return [], None
        oldest = self.pending[0]
        if not oldest.batchable:
            return [oldest], None
        group, images = [], 0
        for job in self.pending:
            if job.batchable and job.key == oldest.key and (not group or images + job.images <= self.max_images):
                group.append(job)
                images += job.images
        left = oldest.arrival + self.wait_s - now
        if images < self.max_images and left > 0 and not oldest.alone:
            return [], left
        return group, None

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            group, wait = self._next_group(time.monotonic())
            if not group:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            for job in group:
                self.pending.remove(job)
            start = time.monotonic()
            self.running = True
            try:
                results = await loop.run_in_executor(self._runner, self.run, group[0].key, [j.payload for j in group])
            except Exception as exc:  # the call failed: every job of it gets the error
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self.running = False
            run_s = time.monotonic() - start
            images = sum(j.images for j in group)
            for job, result in zip(group, results, strict=True):
                info = BatchInfo(images, len(group), start - job.arrival, run_s)
                if not job.future.done():
                    job.future.set_result((result, info))
            if self.on_batch is not None:
                self.on_batch(BatchInfo(images, len(group), start - group[0].arrival, run_s), len(self.pending))
