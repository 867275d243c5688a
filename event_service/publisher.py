"""The front end's way in, in log mode: checked events are published to the event log.

It takes the writer's place behind the same handlers (`submit`, then `Submission.wait`):
a submission completes when JetStream has acked every event of it, i.e. when each is
stored on a majority of the stream's replicas. An acked event will be applied exactly
once by the partition's owner (see `event_service.worker`). Publishing carries the
event_id as ``Nats-Msg-Id``, so a resend within the stream's duplicate window is dropped
by the server (and reported as a duplicate); a resend after it is dropped by the worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from event_service.metrics import EventMetrics
from event_service.writer import QueueFull, Submission, WriterStopped
from eventlog.config import LogConfig
from eventlog.jetstream import Loop, close, connect, ensure_log
from index.apply import Outcome
from index.events import Event
from recsys.v1 import events_pb2

log = logging.getLogger("freshrec.events")
_RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError,
              nats.errors.ConnectionClosedError, ServiceUnavailableError, NoStreamResponseError)


def to_message(event: Event) -> events_pb2.PlaybackEvent:
    """The PlaybackEvent of a checked event (the log's message format)."""
    assert event.occurred_at is not None
    message = events_pb2.PlaybackEvent(event_id=event.event_id, user_id=event.user_id,
                                       item_id=event.item_id, type=event.type,  # type: ignore[arg-type]
                                       watch_fraction=event.watch_fraction)
    seconds = math.floor(event.occurred_at)
    message.occurred_at.seconds = seconds
    message.occurred_at.nanos = min(round((event.occurred_at - seconds) * 1e9), 999_999_999)
    return message


class LogPublisher:
    """Publishes submissions to the log; the event service's writer in log mode."""

    def __init__(self, config: LogConfig, metrics: EventMetrics, max_events: int,
                 publish_timeout_s: float = 30.0) -> None:
        self.config, self.metrics = config, metrics
        self.publish_timeout_s = publish_timeout_s
        self.max_events = max_events
        self._inflight = 0
        self._lock = threading.Condition()
        self._stopping = False
        self._loop: Loop | None = None

    @property
    def version(self) -> str:
        return f"log {self.config.events_stream}"

    def start(self) -> None:
        """Connect (waiting for the cluster's leader) and make sure the log exists."""
        self._loop = Loop()
        self.client, self.js = self._loop.run(connect(self.config, "freshrec-events"), 30)
        self._loop.run(ensure_log(self.js, self.config), 90)
        log.info("publishing events to %s (%d partitions)", self.config.urls,
                 self.config.partitions)

    def stop(self, timeout: float) -> None:
        """Let publishes in flight finish, then close the connection."""
        with self._lock:
            self._stopping = True
            self._lock.wait_for(lambda: self._inflight == 0, timeout)
        if self._loop is not None:
            try:
                self._loop.run(close(self.client), 10)
            finally:
                self._loop.stop()

    def submit(self, submission: Submission, block: bool,
               still_wanted: Callable[[], bool] = lambda: True) -> None:
        """Start publishing a submission; `submission.wait` returns once all are acked."""
        size = len(submission.batch.valid)
        with self._lock:
            while self._inflight + size > self.max_events and self._inflight:
                if not block:
                    raise QueueFull(f"{self._inflight} events are being published")
                self._lock.wait(0.1)
                if not still_wanted():
                    raise WriterStopped("the call ended while waiting to publish")
            if self._stopping:
                raise WriterStopped("the event service is shutting down")
            self._inflight += size
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._publish(submission), self._loop.loop)

    async def _publish(self, submission: Submission) -> None:
        events = submission.batch.valid
        try:
            outcomes = await asyncio.gather(*(self._one(e) for e in events))
            submission.finish(list(outcomes))
            duplicates = sum(o.duplicate for o in outcomes)
            self.metrics.events.labels("published").inc(len(outcomes) - duplicates)
            self.metrics.events.labels("duplicate").inc(duplicates)
            self.metrics.event_to_commit_seconds.observe(time.time() - submission.received_at)
        except Exception as exc:
            log.error("publishing %d events failed: %s", len(events), exc)
            submission.finish(None, WriterStopped(f"the event log did not take the events: "
                                                  f"{exc}"))
        finally:
            self.metrics.events.labels("rejected").inc(len(submission.batch.rejected))
            with self._lock:
                self._inflight -= len(events)
                self._lock.notify_all()

    def publish_catalog(self, payload: bytes, timeout: float | None) -> int:
        """Publish a catalog write (`index.live.write_message`); its stream sequence, once
        stored. Every ranking host applies it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self._retrying(self.config.catalog_subject, payload, {}), self._loop.loop)
        try:
            return int(future.result(timeout).seq)
        except TimeoutError:
            future.cancel()
            raise  # the call's deadline: DEADLINE_EXCEEDED
        except Exception as exc:
            raise WriterStopped(f"the event log did not take the catalog write: {exc}") \
                from exc

    async def _one(self, event: Event) -> Outcome:
        """Publish one event, retrying through a leader election (safe: the server drops
        a repeated Nats-Msg-Id)."""
        subject = self.config.events_subject(self.config.partition(event.user_id))
        ack = await self._retrying(subject, to_message(event).SerializeToString(),
                                   {"Nats-Msg-Id": event.event_id})
        return Outcome(bool(ack.duplicate), True, 0, int(ack.seq))

    async def _retrying(self, subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        """Publish, retrying through a leader election until `publish_timeout_s`."""
        deadline = time.monotonic() + self.publish_timeout_s
        while True:
            try:
                return await self.js.publish(subject, payload, timeout=2, headers=headers)
            except (*_RETRYABLE, APIError) as exc:
                retry = isinstance(exc, _RETRYABLE) or getattr(exc, "code", 0) == 503
                if not retry or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
