"""A Python client of both services that does the right thing by default.

- Every call has a deadline (`Client(deadline_s=...)`, or `timeout=` per call).
- Calls that are safe to repeat (all of the ranking service's, Track and GetUser: an event
  is deduplicated by its event_id) are retried by gRPC itself, through the channel's
  service config, on UNAVAILABLE and RESOURCE_EXHAUSTED, with exponential backoff.
- `EventStream` keeps one IngestStream open, numbers the batches, and after a broken
  stream (a restart, a dropped connection, RESOURCE_EXHAUSTED) reconnects with backoff and
  sends every batch not yet acked again: safe, since the service drops events it has
  applied already (reported as duplicates). What was acked is reported per batch.
- TLS (server CA, optionally a client certificate for mutual TLS) and a bearer token.

    from freshrec.client import Client
    with Client("localhost:50051", "localhost:50052") as client:
        client.track("e1", "u1", "i42")
        for item in client.recommend("u1", k=10).items:
            print(item.title, item.reason.text)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from recsys.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
)

EVENTS, RANKING, ITEMS = ("recsys.v1.EventService", "recsys.v1.RankingService",
                          "recsys.v1.ItemService")
RETRYABLE = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
Retrieval: TypeAlias = ranking_pb2.Retrieval
BLEND: Retrieval = ranking_pb2.RETRIEVAL_BLEND
# A broken IngestStream is reopened (and its unacked batches sent again) on these.
_RECONNECT_ON = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}


def service_config(attempts: int = 5, initial_backoff_s: float = 0.05,
                   max_backoff_s: float = 1.0) -> str:
    """The channel's service config: gRPC retries the calls that are safe to repeat."""
    retry = {"maxAttempts": attempts, "initialBackoff": f"{initial_backoff_s}s",
             "maxBackoff": f"{max_backoff_s}s", "backoffMultiplier": 2,
             "retryableStatusCodes": RETRYABLE}
    return json.dumps({"methodConfig": [
        {"name": [{"service": RANKING}], "retryPolicy": retry},
        {"name": [{"service": EVENTS, "method": "Track"},
                  {"service": EVENTS, "method": "GetUser"}], "retryPolicy": retry},
        {"name": [{"service": ITEMS}], "retryPolicy": retry},  # a put or take-down repeated
        # leaves the same catalog
    ]})


@dataclass(frozen=True)
class Tls:
    """TLS to the services: the CA that signed their certificates, and for mutual TLS this
    client's certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials."""
        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def channel(target: str, tls: Tls | None = None, token: str | None = None) -> grpc.Channel:
    """A channel with the retry policy, over TLS if given, sending the token if given."""
    options = [("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]
    if tls is None:
        if token is not None:
            raise ValueError("a token needs TLS (it would travel in the clear)")
        return grpc.insecure_channel(target, options=options)
    credentials = tls.credentials()
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=options)


def playback(event_id: str, user_id: str, item_id: str,
             type: int = events_pb2.PLAY_COMPLETE, watch_fraction: float = 1.0,
             occurred_at: float | None = None) -> events_pb2.PlaybackEvent:
    """A PlaybackEvent; without `occurred_at` (unix seconds) the service stamps the time it
    receives it."""
    event = events_pb2.PlaybackEvent(event_id=event_id, user_id=user_id, item_id=item_id,
                                     type=type, watch_fraction=watch_fraction)  # type: ignore[arg-type]
    if occurred_at is not None:
        stamp = Timestamp()
        stamp.FromNanoseconds(int(occurred_at * 1e9))
        event.occurred_at.CopyFrom(stamp)
    return event


class Client:
    """Both services, with deadlines, retries, TLS and a token (see the module's docs)."""

    def __init__(self, events_target: str = "localhost:50051",
                 ranking_target: str = "localhost:50052", *, tls: Tls | None = None,
                 token: str | None = None, deadline_s: float = 2.0) -> None:
        self.deadline_s = deadline_s
        self._events_channel = channel(events_target, tls, token)
        self._ranking_channel = channel(ranking_target, tls, token)
        self.events = events_pb2_grpc.EventServiceStub(self._events_channel)
        self.ranking = ranking_pb2_grpc.RankingServiceStub(self._ranking_channel)
        self.items = catalog_pb2_grpc.ItemServiceStub(self._events_channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close both channels."""
        self._events_channel.close()
        self._ranking_channel.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.deadline_s if timeout is None else timeout

    # -- ranking ------------------------------------------------------------------------

    def recommend(self, user_id: str, k: int = 10, *, filter: ranking_pb2.Filter | None = None,
                  include_watched: bool = False, retrieval: Retrieval = BLEND,
                  min_user_version: int = 0, min_log_sequence: int = 0,
                  timeout: float | None = None) -> ranking_pb2.RecommendResponse:
        """The user's top k items, each with its reason. `min_user_version` (a Track's
        `user_version`) reads your write: the service waits for it within the deadline."""
        return self.ranking.Recommend(ranking_pb2.RecommendRequest(
            user_id=user_id, k=k, filter=filter, include_watched=include_watched,
            retrieval=retrieval, min_user_version=min_user_version,
            min_log_sequence=min_log_sequence), timeout=self._timeout(timeout))

    def home_page(self, user_id: str, k_per_row: int = 10, *,
                  filter: ranking_pb2.Filter | None = None, retrieval: Retrieval = BLEND,
                  min_user_version: int = 0, min_log_sequence: int = 0,
                  timeout: float | None = None) -> ranking_pb2.HomePageResponse:
        """The user's home page rows (`min_user_version` as in `recommend`)."""
        return self.ranking.HomePage(ranking_pb2.HomePageRequest(
            user_id=user_id, k_per_row=k_per_row, filter=filter, retrieval=retrieval,
            min_user_version=min_user_version, min_log_sequence=min_log_sequence),
            timeout=self._timeout(timeout))

    def similar_items(self, item_id: str, k: int = 10, *,
                      filter: ranking_pb2.Filter | None = None, retrieval: Retrieval = BLEND,
                      timeout: float | None = None) -> ranking_pb2.SimilarItemsResponse:
        """Items like `item_id`."""
        return self.ranking.SimilarItems(ranking_pb2.SimilarItemsRequest(
            item_id=item_id, k=k, filter=filter, retrieval=retrieval),
            timeout=self._timeout(timeout))

    def rank_items(self, user_id: str, item_ids: Sequence[str], *,
                   filter: ranking_pb2.Filter | None = None, retrieval: Retrieval = BLEND,
                   min_user_version: int = 0, min_log_sequence: int = 0,
                   timeout: float | None = None) -> ranking_pb2.RankItemsResponse:
        """The given items ordered for the user (unknown ids reported, not fatal)."""
        return self.ranking.RankItems(ranking_pb2.RankItemsRequest(
            user_id=user_id, item_ids=list(item_ids), filter=filter, retrieval=retrieval,
            min_user_version=min_user_version, min_log_sequence=min_log_sequence),
            timeout=self._timeout(timeout))

    # -- events -------------------------------------------------------------------------

    def track(self, event_id: str, user_id: str, item_id: str, *,
              type: int = events_pb2.PLAY_COMPLETE, watch_fraction: float = 1.0,
              occurred_at: float | None = None, timeout: float | None = None
              ) -> events_pb2.TrackResponse:
        """Apply one event (retried safely: a repeat is a duplicate)."""
        return self.events.Track(events_pb2.TrackRequest(event=playback(
            event_id, user_id, item_id, type, watch_fraction, occurred_at)),
            timeout=self._timeout(timeout))

    def get_user(self, user_id: str, timeout: float | None = None) -> events_pb2.User:
        """The user's current state."""
        return self.events.GetUser(events_pb2.GetUserRequest(user_id=user_id),
                                   timeout=self._timeout(timeout))

    # -- the live catalog (admin) ---------------------------------------------------------

    def put_items(self, items: Sequence[catalog_pb2.CatalogItem], timeout: float | None = None
                  ) -> catalog_pb2.PutItemsResponse:
        """Add or update up to 1,000 items; served by every ranking worker within a poll."""
        return self.items.PutItems(catalog_pb2.PutItemsRequest(items=list(items)),
                                   timeout=self._timeout(timeout))

    def take_down_items(self, item_ids: Sequence[str], timeout: float | None = None
                        ) -> catalog_pb2.TakeDownItemsResponse:
        """Take items down from every RPC until they are put again."""
        return self.items.TakeDownItems(catalog_pb2.TakeDownItemsRequest(
            item_ids=list(item_ids)), timeout=self._timeout(timeout))

    def get_item(self, item_id: str, timeout: float | None = None) -> catalog_pb2.ItemState:
        """An item's state in the live catalog."""
        return self.items.GetItem(catalog_pb2.GetItemRequest(item_id=item_id),
                                  timeout=self._timeout(timeout))

    def event_stream(self, max_inflight: int = 64,
                     on_ack: Callable[[events_pb2.IngestStreamResponse], None] | None = None
                     ) -> EventStream:
        """An IngestStream that survives reconnects (see `EventStream`)."""
        return EventStream(self.events, max_inflight, on_ack=on_ack)


@dataclass
class Acked:
    """What the service reported for the acked batches so far."""

    batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejections: list[events_pb2.Rejection] = field(default_factory=list)
    reconnects: int = 0


class EventStream:
    """Batches of events over one long-lived IngestStream, none lost across reconnects.

    `send` numbers a batch and returns its sequence; it blocks while `max_inflight`
    batches await their ack. A background thread runs the stream; when it breaks, it
    reconnects (backoff from `initial_backoff_s` doubling to `max_backoff_s`) and sends
    every unacked batch again, in order, before new ones. `flush` waits until every batch
    sent is acked; `acked` says what the service reported; `close` flushes and ends.
    """

    def __init__(self, stub: events_pb2_grpc.EventServiceStub, max_inflight: int = 64,
                 initial_backoff_s: float = 0.05, max_backoff_s: float = 2.0,
                 on_ack: Callable[[events_pb2.IngestStreamResponse], None] | None = None
                 ) -> None:
        self._stub, self.max_inflight = stub, max_inflight
        self._backoff = (initial_backoff_s, max_backoff_s)
        self._on_ack = on_ack
        self._changed = threading.Condition()
        self._unacked: dict[int, events_pb2.IngestStreamRequest] = {}  # in sequence order
        self._next = 1
        self._generation = 0
        self._closing = False
        self._abandoned = False  # closed with batches unacked (close timed out)
        self._error: BaseException | None = None
        self.acked = Acked()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="freshrec-event-stream")
        self._thread.start()

    def send(self, events: Sequence[events_pb2.PlaybackEvent],
             timeout: float | None = None) -> int:
        """Queue one batch; its sequence. Blocks while max_inflight batches are unacked
        (TimeoutError after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(
                    lambda: len(self._unacked) < self.max_inflight or self._closing, timeout):
                raise TimeoutError(f"{len(self._unacked)} batches unacked after {timeout} s")
            if self._error is not None:
                raise self._error
            if self._closing:
                raise RuntimeError("the stream is closed")
            sequence, self._next = self._next, self._next + 1
            self._unacked[sequence] = events_pb2.IngestStreamRequest(sequence=sequence,
                                                                     events=list(events))
            self._changed.notify_all()
            return sequence

    @property
    def unacked(self) -> int:
        """Batches sent and not yet acked."""
        with self._changed:
            return len(self._unacked)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every batch sent so far is acked (TimeoutError after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._unacked or self._error, timeout):
                raise TimeoutError(f"{len(self._unacked)} batches unacked after {timeout} s")
            if self._error is not None:
                raise self._error

    def close(self, timeout: float | None = 30.0) -> Acked:
        """Flush (TimeoutError after `timeout`: the unacked batches are then not sent
        again), end the stream, stop the thread; what was acked."""
        flushed = False
        try:
            self.flush(timeout)
            flushed = True
        finally:
            with self._changed:
                self._closing = True
                self._abandoned = not flushed  # the thread stops without them
                self._changed.notify_all()
            self._thread.join(timeout)
        return self.acked

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _requests(self, generation: int) -> Iterator[events_pb2.IngestStreamRequest]:
        """What one connection sends: every unacked batch (the resend, after a reconnect),
        then each new one; ends when the stream closes or another connection takes over."""
        sent = 0
        while True:
            with self._changed:
                while True:
                    if self._generation != generation:
                        return
                    pending = [r for s, r in self._unacked.items() if s > sent]
                    if pending:
                        break
                    if self._closing:
                        return  # half-close: the service acks what it has, then ends
                    self._changed.wait(0.1)
            for request in pending:
                sent = request.sequence
                yield request

    def _run(self) -> None:
        backoff = self._backoff[0]
        while True:
            with self._changed:
                generation = self._generation
            try:
                for response in self._stub.IngestStream(self._requests(generation)):
                    self._ack(response)
                    backoff = self._backoff[0]
            except grpc.RpcError as error:
                if error.code() not in _RECONNECT_ON:  # e.g. PERMISSION_DENIED: no retry
                    self._fail(error)
                    return
            except Exception as error:  # a closed channel, an on_ack that raised: stop
                self._fail(error)
                return
            finally:
                with self._changed:
                    self._generation += 1  # that connection's request iterator stops
                    self._changed.notify_all()
            with self._changed:
                if self._closing and (not self._unacked or self._abandoned):
                    return  # ended as asked: everything acked, or given up by close
            self.acked.reconnects += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, self._backoff[1])

    def _fail(self, error: BaseException) -> None:
        """The stream cannot go on: flush, send and close raise `error`."""
        with self._changed:
            self._error = error
            self._closing = True
            self._changed.notify_all()

    def _ack(self, response: events_pb2.IngestStreamResponse) -> None:
        with self._changed:
            if self._unacked.pop(response.sequence, None) is None:
                return  # acked before (on a connection that broke before we read it)
            acked = self.acked
            acked.batches += 1
            acked.accepted += response.accepted
            acked.duplicates += response.duplicates
            acked.rejections.extend(response.rejections)
            self._changed.notify_all()
        if self._on_ack is not None:
            self._on_ack(response)
