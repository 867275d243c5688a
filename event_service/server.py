"""gRPC shell of the event service: protos to domain calls, domain errors to status codes."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health
from threadpoolctl import threadpool_limits

from event_service.config import Settings
from event_service.metrics import EventMetrics
from event_service.writer import QueueFull, Submission, Writer, WriterConfig, WriterStopped
from index import snapshots_dir, users_dir
from index.catalog import CatalogSnapshot
from index.events import Event, Rejection, validate
from index.store import StoreFullError, StoreWriteError, UserStore
from recsys.v1 import events_pb2, events_pb2_grpc
from rpc.errors import BadRequest, mapped_errors, remaining
from rpc.server import add_health_and_reflection, bind, new_server, set_serving

log = logging.getLogger("freshrec.events")
SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name
_END = object()
# Who may call what when auth is on (rpc.security): writes need the ingest role.
POLICY = {f"/{SERVICE}/{method}": role for method, role in (
    ("Track", "ingest"), ("Ingest", "ingest"), ("IngestStream", "ingest"),
    ("GetUser", "viewer"))}


class UnknownUser(LookupError):
    """GetUser of a user the store does not have."""


def _occurred_at(event: events_pb2.PlaybackEvent) -> float | None:
    if not event.HasField("occurred_at"):
        return None
    stamp = event.occurred_at
    if not 0 <= stamp.nanos < 1_000_000_000:
        return float("nan")
    return stamp.seconds + stamp.nanos / 1e9


def to_event(message: events_pb2.PlaybackEvent) -> Event:
    """The domain event of a PlaybackEvent message."""
    return Event(message.event_id, message.user_id, message.item_id, int(message.type),
                 _occurred_at(message), message.watch_fraction)


@dataclass
class _Batch:
    submission: Submission
    sequence: int


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Track, Ingest, IngestStream and GetUser over the writer and the store."""

    error_codes = {
        UnknownUser: grpc.StatusCode.NOT_FOUND,
        QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
        StoreFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
        StoreWriteError: grpc.StatusCode.UNAVAILABLE,
        WriterStopped: grpc.StatusCode.UNAVAILABLE,
    }

    def __init__(self, settings: Settings, writer: Writer, store: UserStore) -> None:
        self.settings, self.writer, self.store = settings, writer, store

    def _submission(self, messages: Iterable[events_pb2.PlaybackEvent], offset: int = 0
                    ) -> Submission:
        events = [to_event(m) for m in messages]
        if len(events) > self.settings.max_batch_events:
            raise BadRequest(f"{len(events)} events in one message; the limit is "
                             f"{self.settings.max_batch_events}")
        now = time.time()
        valid, rejected = [], []
        for index, event in enumerate(events):
            problem = validate(event, now, self.settings.limits)
            if problem is None:
                valid.append(event)
            else:
                rejected.append((Rejection(offset + index, event.event_id, *problem), event))
        return Submission(valid, rejected)

    @mapped_errors
    def Track(self, request: events_pb2.TrackRequest, context: grpc.ServicerContext
              ) -> events_pb2.TrackResponse:
        submission = self._submission([request.event])
        if submission.rejected:
            rejection = submission.rejected[0][0]
            raise BadRequest(f"{rejection.reason}: {rejection.message}")
        self.writer.submit(submission, block=False)
        result = submission.wait(remaining(context))
        return events_pb2.TrackResponse(duplicate=result.duplicate[0],
                                        user_version=result.user_version[0],
                                        item_known=result.item_known[0])

    @mapped_errors
    def Ingest(self, request_iterator: Iterator[events_pb2.IngestRequest],
               context: grpc.ServicerContext) -> events_pb2.IngestResponse:
        # The whole stream is read and checked before anything is queued, so a refused
        # call changes nothing; IngestStream is the pipelined, per-batch-ack way in.
        submissions, offset = [], 0
        for request in request_iterator:
            submissions.append(self._submission(request.events, offset))
            offset += len(request.events)
            if offset > self.settings.queue_max_events:
                raise BadRequest(f"more than {self.settings.queue_max_events} events in one "
                                 "Ingest call; split it or use IngestStream")
        for submission in submissions:
            self.writer.submit(submission, block=True, still_wanted=context.is_active)
        summary = events_pb2.IngestResponse()
        for submission in submissions:
            result = submission.wait(remaining(context))
            _count(summary, submission, result)
            summary.rejected += len(submission.rejected)
        return summary

    @mapped_errors
    def IngestStream(self, request_iterator: Iterator[events_pb2.IngestStreamRequest],
                     context: grpc.ServicerContext) -> Iterator[events_pb2.IngestStreamResponse]:
        # A reader thread keeps submitting while this one acks in order, so batches of one
        # stream are committed together; the bounded in-flight queue is the flow control.
        inflight: queue.Queue[Any] = queue.Queue(self.settings.stream_max_inflight)
        threading.Thread(target=self._read_stream, args=(request_iterator, context, inflight),
                         daemon=True, name="freshrec-stream-reader").start()
        while True:
            try:
                item = inflight.get(timeout=0.1)
            except queue.Empty:
                if not context.is_active():  # cancelled: the reader has stopped too
                    return
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            result = item.submission.wait()
            response = events_pb2.IngestStreamResponse(sequence=item.sequence)
            _count(response, item.submission, result)
            yield response

    def _read_stream(self, requests: Iterator[events_pb2.IngestStreamRequest],
                     context: grpc.ServicerContext, inflight: queue.Queue[Any]) -> None:
        def put(item: Any) -> bool:
            while context.is_active():
                try:
                    inflight.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for request in requests:
                submission = self._submission(request.events)
                self.writer.submit(submission, block=True, still_wanted=context.is_active)
                if not put(_Batch(submission, request.sequence)):
                    return
            put(_END)
        except grpc.RpcError:
            put(_END)  # the client went away; what it sent so far is still applied
        except Exception as exc:
            put(exc)

    @mapped_errors
    def GetUser(self, request: events_pb2.GetUserRequest, context: grpc.ServicerContext
                ) -> events_pb2.User:
        if not request.user_id:
            raise BadRequest("user_id is empty")
        record = self.store.get_user(request.user_id)
        if record is None:
            raise UnknownUser(f"unknown user {request.user_id!r}")
        updated = Timestamp()
        updated.FromNanoseconds(int(record.updated_at * 1e9))
        return events_pb2.User(user_id=record.user_id, vector=record.vector.tolist(),
                               version=record.version, model_version=record.model_version,
                               updated_at=updated, history_size=len(record.item_ids),
                               recent_item_ids=record.recent_item_ids(20))


def _count(response: Any, submission: Submission, result: Any) -> None:
    duplicates = sum(result.duplicate)
    response.accepted += len(result.duplicate) - duplicates
    response.duplicates += duplicates
    response.unknown_items += sum(not k and not d for k, d in
                                  zip(result.item_known, result.duplicate, strict=True))
    response.rejections.extend(events_pb2.Rejection(index=r.index, event_id=r.event_id,
                                                    reason=r.reason, message=r.message)
                               for r, _ in submission.rejected)


@dataclass
class Deps:
    """What the server runs on; built by `open_deps` or by tests."""

    store: UserStore
    catalog: CatalogSnapshot
    metrics: EventMetrics


def open_deps(settings: Settings) -> Deps:
    """Open the store and the live snapshot's item factors (SnapshotError if there is none)."""
    catalog = CatalogSnapshot.load(snapshots_dir(settings.data_dir), with_index=False)
    store = UserStore(users_dir(settings.data_dir), map_size=settings.store_map_bytes,
                      max_map_size=settings.store_max_bytes)
    return Deps(store, catalog, EventMetrics())


class EventServer:
    """The running server with its writer; `stop` drains and commits before closing."""

    def __init__(self, server: grpc.Server, writer: Writer, health: health.HealthServicer,
                 store: UserStore, mode: str) -> None:
        self.server, self.writer, self.health, self.store = server, writer, health, store
        self.mode = mode  # e.g. "insecure, auth off", for the start-up log

    def stop(self, grace: float) -> None:
        """Refuse new calls, let calls in flight finish, drain the writer, close the store."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.writer.stop(timeout=grace + 30)
        self.store.close()


def create_server(settings: Settings, deps: Deps) -> tuple[EventServer, int]:
    """Build and start the server on settings.host:port; returns it and the bound port."""
    # Parallelism comes from batching users, not BLAS threads: on 2 cores they only spin
    # against the gRPC threads (process-wide setting).
    threadpool_limits(1, "blas")
    config = WriterConfig(settings.weights, settings.policy, settings.queue_max_events,
                          settings.group_max_events, settings.group_window_ms / 1000,
                          settings.item_half_life_s, settings.dedupe_retention_s,
                          settings.snapshot_poll_s)
    writer = Writer(deps.store, snapshots_dir(settings.data_dir), deps.catalog, config,
                    deps.metrics)
    server = new_server(settings, POLICY)
    events_pb2_grpc.add_EventServiceServicer_to_server(
        EventServicer(settings, writer, deps.store), server)
    health_servicer = add_health_and_reflection(server, [SERVICE], settings.reflection)
    port, mode = bind(server, settings)
    writer.start()
    server.start()
    set_serving(health_servicer, [SERVICE])
    return EventServer(server, writer, health_servicer, deps.store, mode), port
