"""A bounded wait queue that batches requests across clients: what keeps serve.py useful under load.

    queue = BatchQueue(run_batch, max_batch=16, max_wait_ms=5, queue_size=64, queue_timeout=30)
    result = await queue.submit(key, item)       # in a request handler; raises QueueFull / QueueTimeout

Requests wait their turn in a queue of at most `queue_size`; past it `submit` raises QueueFull at once
(serve.py answers 503 with Retry-After), and a request still waiting after `queue_timeout` seconds raises
QueueTimeout (503 too): never an unbounded wait. One worker task takes the oldest request and every other
waiting one with the same key (up to `max_batch`), waiting at most `max_wait_ms` for more to arrive, and
hands them to `run_batch(key, items)` in a thread: serve.py detects the faces of every photo, then runs the
network once over all of their faces, which costs less per face than one photo at a time. Requests of
another key (another detector, other test-time views) keep their place for a later batch.
`run_batch` returns one result per item, or an exception instance for an item that failed alone.
"""
import asyncio
import collections
import math
import time


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class _Job:
    __slots__ = ("key", "item", "future", "queued_at")

    def __init__(self, key, item, future, queued_at):
        self.key, self.item, self.future, self.queued_at = key, item, future, queued_at


class BatchQueue:
    def __init__(self, run_batch, max_batch=16, max_wait_ms=5.0, queue_size=64, queue_timeout=30.0, on_batch=None):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0 or queue_timeout <= 0:
            raise ValueError("max_batch and queue_size must be at least 1, max_wait_ms at least 0, queue_timeout above 0")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait, self.queue_size, self.queue_timeout = max_batch, max_wait_ms / 1000, queue_size, queue_timeout
        self.waiting = collections.deque()
        self.running = 0  # requests in the batch being run now
        self.seconds_per_request = 0.05  # a running estimate, for Retry-After
        self._arrived = None
        self._worker = None

    @property
    def depth(self):
        """Requests waiting for their turn (not counting the batch being run)."""
        return len(self.waiting)

    def check_room(self):
        """QueueFull where a request submitted now would be refused: serve.py asks before any work is spent on it."""
        if len(self.waiting) >= self.queue_size:
            raise QueueFull(f"{len(self.waiting)} requests already waiting (the queue holds {self.queue_size})")

    def retry_after(self):
        """Seconds after which a refused client may well find room: the time to serve the queue as it is."""
        return max(1, math.ceil((len(self.waiting) + self.running) * self.seconds_per_request))

    async def submit(self, key, item):
        """Wait for `item` to be run in a batch of its `key`; its result, or the exception run_batch gave it."""
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        self.check_room()
        job = _Job(key, item, asyncio.get_running_loop().create_future(), time.monotonic())
        self.waiting.append(job)
        self._arrived.set()
        try:
            done, _ = await asyncio.wait({job.future}, timeout=self.queue_timeout)
            if not done and job in self.waiting:  # never started: give up the place in the queue
                self.waiting.remove(job)
                raise QueueTimeout(f"waited {self.queue_timeout:g} s in the queue without being served")
            return await job.future  # started in time: wait for it to finish
        except asyncio.CancelledError:  # the client went away: its photo is not analysed for nobody
            if job in self.waiting:
                self.waiting.remove(job)
            job.future.cancel()
            raise

    def _take(self, batch):
        """Move waiting jobs of the batch's key into it, oldest first, up to max_batch."""
        for job in [j for j in self.waiting if j.key == batch[0].key][: self.max_batch - len(batch)]:
            self.waiting.remove(job)
            batch.append(job)

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = [self.waiting.popleft()]
            deadline = loop.time() + self.max_wait
            self._take(batch)
            while len(batch) < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    pass
                self._take(batch)
            batch = [job for job in batch if not job.future.done()]  # a client that went away
            if not batch:
                continue
            self.running = len(batch)
            started = time.monotonic()
            try:
                results = await asyncio.to_thread(self.run_batch, batch[0].key, [job.item for job in batch])
            except Exception as e:  # the whole batch failed: each request gets the error
                results = [e] * len(batch)
            finally:
                self.running = 0
            elapsed = time.monotonic() - started
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * elapsed / len(batch)
            if self.on_batch is not None:
                self.on_batch(batch[0].key, [job.item for job in batch], results, elapsed)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
