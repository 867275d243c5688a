"""gRPC shell of the event service: protos to domain calls, domain errors to status codes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from event_service.config import Settings
from event_service.items import POLICY as ITEM_POLICY
from event_service.items import SERVICE as ITEM_SERVICE
from event_service.items import ItemServicer
from event_service.metrics import EventMetrics
from event_service.writer import Submission, Writer
from index import snapshots_dir, users_dir
from index.apply import Outcome
from index.catalog import CatalogSnapshot
from index.errors import FailedPrecondition, InvalidArgument, NotFound
from index.events import Event, check_batch
from index.follower import SnapshotFollower
from index.store import UserStore
from recsys.v1 import catalog_pb2_grpc, events_pb2, events_pb2_grpc
from rpc.errors import remaining
from rpc.server import Service, assemble

if TYPE_CHECKING:  # imported when used: the embedded mode never imports NATS
    from event_service.publisher import LogPublisher

SERVICE = events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name
_END = object()
# Who may call what when auth is on (rpc.security): writes need the ingest role.
POLICY = {f"/{SERVICE}/{method}": role for method, role in (
    ("Track", "ingest"), ("Ingest", "ingest"), ("IngestStream", "ingest"),
    ("GetUser", "viewer"))}


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
class _InFlight:
    """A stream's batch, submitted, waiting for its ack."""

    submission: Submission
    sequence: int


class EventServicer(events_pb2_grpc.EventServiceServicer):
    """Track, Ingest, IngestStream and GetUser over the writer and the store."""

    def __init__(self, settings: Settings, writer: Writer | LogPublisher,
                 store: UserStore | None, metrics: EventMetrics) -> None:
        self.settings, self.writer, self.store, self.metrics = settings, writer, store, metrics

    def _submission(self, messages: Iterable[events_pb2.PlaybackEvent], offset: int = 0
                    ) -> Submission:
        events = [to_event(m) for m in messages]
        batch = check_batch(events, time.time(), self.settings.limits, offset)
        if batch.received_at:
            self.metrics.received_at.inc(batch.received_at)
        return Submission(batch)

    def Track(self, request: events_pb2.TrackRequest, context: grpc.ServicerContext
              ) -> events_pb2.TrackResponse:
        submission = self._submission([request.event])
        if submission.batch.rejected:
            rejection = submission.batch.rejected[0][0]
            raise InvalidArgument(f"{rejection.reason}: {rejection.message}")
        self.writer.submit(submission, block=False)
        outcome = submission.wait(remaining(context))[0]
        return events_pb2.TrackResponse(duplicate=outcome.duplicate,
                                        user_version=outcome.user_version,
                                        item_known=outcome.item_known,
                                        log_sequence=outcome.log_sequence,
                                        occurred_at_defaulted=bool(submission.batch.received_at))

    def Ingest(self, request_iterator: Iterator[events_pb2.IngestRequest],
               context: grpc.ServicerContext) -> events_pb2.IngestResponse:
        # The whole stream is read and checked before anything is queued, so a refused
        # call changes nothing; IngestStream is the pipelined, per-batch-ack way in.
        submissions, offset = [], 0
        for request in request_iterator:
            submissions.append(self._submission(request.events, offset))
            offset += len(request.events)
            if offset > self.settings.queue_max_events:
                raise InvalidArgument(f"more than {self.settings.queue_max_events} events in one "
                                 "Ingest call; split it or use IngestStream")
        for submission in submissions:
            self.writer.submit(submission, block=True, still_wanted=context.is_active)
        summary = events_pb2.IngestResponse()
        for submission in submissions:
            _count(summary, submission, submission.wait(remaining(context)))
            summary.rejected += len(submission.batch.rejected)
        return summary

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
            response = events_pb2.IngestStreamResponse(sequence=item.sequence)
            _count(response, item.submission, item.submission.wait())
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
                if not put(_InFlight(submission, request.sequence)):
                    return
            put(_END)
        except grpc.RpcError:
            put(_END)  # the client went away; what it sent so far is still applied
        except Exception as exc:
            put(exc)

    def GetUser(self, request: events_pb2.GetUserRequest, context: grpc.ServicerContext
                ) -> events_pb2.User:
        if not request.user_id:
            raise InvalidArgument("user_id is empty")
        if self.store is None:
            raise FailedPrecondition("in log mode users live in the workers' shards: read "
                                     "them from a ranking replica")
        record = self.store.get_user(request.user_id)
        if record is None:
            raise NotFound(f"unknown user {request.user_id!r}")
        updated = Timestamp()
        updated.FromNanoseconds(int(record.updated_at * 1e9))
        return events_pb2.User(user_id=record.user_id, vector=record.vector.tolist(),
                               version=record.version, model_version=record.model_version,
                               updated_at=updated, history_size=len(record.item_ids),
                               recent_item_ids=record.recent_item_ids(20),
                               dismissed_item_ids=record.dismissed[::-1])


def _count(response: Any, submission: Submission, outcomes: list[Outcome]) -> None:
    duplicates = sum(o.duplicate for o in outcomes)
    response.accepted += len(outcomes) - duplicates
    response.duplicates += duplicates
    response.unknown_items += sum(not o.item_known and not o.duplicate for o in outcomes)
    response.log_sequence = max([response.log_sequence, *(o.log_sequence for o in outcomes)])
    response.occurred_at_defaulted += submission.batch.received_at
    response.rejections.extend(events_pb2.Rejection(index=r.index, event_id=r.event_id,
                                                    reason=r.reason, message=r.message)
                               for r, _ in submission.batch.rejected)




@dataclass
class Deps:
    """What the server runs on; built by `open_deps` (tests may pass their own store)."""

    store: UserStore | None  # None in log mode
    writer: Writer | LogPublisher  # not started: the service starts and stops it
    metrics: EventMetrics

    @property
    def model_version(self) -> str:
        """The live model version (in log mode, the log the events go to)."""
        if isinstance(self.writer, Writer):
            return self.writer.catalogs.version
        return self.writer.version


def open_deps(settings: Settings, store: UserStore | None = None) -> Deps:
    """Open the store and the live snapshot's item factors (SnapshotError if there is none);
    in log mode, only the publisher (the workers own the stores)."""
    if settings.log_urls:
        from event_service.publisher import LogPublisher

        metrics = EventMetrics()
        return Deps(None, LogPublisher(settings.log, metrics, settings.queue_max_events),
                    metrics)
    root = snapshots_dir(settings.data_dir)
    catalogs = SnapshotFollower(root, lambda v: CatalogSnapshot.load(root, v, with_index=False),
                                lambda catalog: catalog.model_version)
    if store is None:
        store = UserStore(users_dir(settings.data_dir), map_size=settings.store_map_bytes,
                          max_map_size=settings.store_max_bytes)
    metrics = EventMetrics()
    return Deps(store, Writer(store, catalogs, settings.writer, metrics), metrics)


def create_server(settings: Settings, deps: Deps) -> tuple[Service, int]:
    """Build and start the server on settings.host:port; returns it and the bound port."""
    def add(server: grpc.Server) -> None:
        events_pb2_grpc.add_EventServiceServicer_to_server(
            EventServicer(settings, deps.writer, deps.store, deps.metrics), server)
        catalog_pb2_grpc.add_ItemServiceServicer_to_server(ItemServicer(
            deps.writer, deps.store, settings.max_id_length), server)

    store = deps.store
    return assemble(settings, POLICY | ITEM_POLICY, [SERVICE, ITEM_SERVICE], add,
                    parts=[deps.writer],
                    close=store.close if store is not None else lambda: None)
