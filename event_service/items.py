"""gRPC shell of the live catalog's writes (ItemService): puts and take-downs go through the
event service's one writer, in its txns, and are acked once durable; in log mode, into the
log's catalog stream, from which every ranking host applies them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from event_service.writer import CatalogWrite, Submission, Writer
from index.errors import FailedPrecondition, NotFound
from index.live import (
    CatalogItem,
    Written,
    catalog_version,
    check_ids,
    check_items,
    put_items,
    read_items,
    snapshot_item,
    take_down,
    write_message,
)
from index.store import UserStore
from recsys.v1 import catalog_pb2, catalog_pb2_grpc
from rpc.errors import remaining

if TYPE_CHECKING:  # imported when used: the embedded mode never imports NATS
    from event_service.publisher import LogPublisher

SERVICE = catalog_pb2.DESCRIPTOR.services_by_name["ItemService"].full_name
POLICY = {f"/{SERVICE}/{method}": role for method, role in (
    ("PutItems", "admin"), ("TakeDownItems", "admin"), ("GetItem", "viewer"))}


def _time(message: catalog_pb2.CatalogItem, name: str) -> float:
    """A window bound in unix seconds (0: unset; NaN: invalid nanos)."""
    if not message.HasField(name):
        return 0.0
    stamp: Timestamp = getattr(message, name)
    if not 0 <= stamp.nanos < 1_000_000_000:
        return math.nan
    return stamp.seconds + stamp.nanos / 1e9 if stamp.seconds or stamp.nanos else 0.0


def to_item(message: catalog_pb2.CatalogItem) -> CatalogItem:
    """The domain item of a CatalogItem message."""
    return CatalogItem(message.item_id, message.title, tuple(message.genres), message.year,
                       _time(message, "available_from"), _time(message, "available_until"))


def _stamp(at: float) -> Timestamp | None:
    if not at:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def to_message(item: CatalogItem) -> catalog_pb2.CatalogItem:
    """The CatalogItem message of a domain item."""
    return catalog_pb2.CatalogItem(item_id=item.item_id, title=item.title, genres=item.genres,
                                   year=item.year, available_from=_stamp(item.available_from),
                                   available_until=_stamp(item.available_until))


class ItemServicer(catalog_pb2_grpc.ItemServiceServicer):
    """PutItems, TakeDownItems (admin) and GetItem."""

    def __init__(self, writer: Writer | LogPublisher, store: UserStore | None,
                 max_id_length: int) -> None:
        self.writer, self.store, self.max_id_length = writer, store, max_id_length

    def _write(self, write: CatalogWrite, message: Callable[[], bytes],
               context: grpc.ServicerContext) -> Written:
        """Through the writer (embedded), or (log mode) into the catalog stream."""
        if not isinstance(self.writer, Writer):
            return Written(log_sequence=self.writer.publish_catalog(message(),
                                                                    remaining(context)))
        submission = Submission(write=write)
        self.writer.submit(submission, block=False)
        submission.wait(remaining(context))
        assert submission.written is not None
        return submission.written

    def PutItems(self, request: catalog_pb2.PutItemsRequest, context: grpc.ServicerContext
                 ) -> catalog_pb2.PutItemsResponse:
        items = [to_item(m) for m in request.items]
        check_items(items, self.max_id_length)
        written = self._write(lambda w, catalog, now: put_items(w, catalog, items, now),
                              lambda: write_message(items=items), context)
        return catalog_pb2.PutItemsResponse(added=written.added, updated=written.updated,
                                            catalog_version=written.catalog_version,
                                            log_sequence=written.log_sequence)

    def TakeDownItems(self, request: catalog_pb2.TakeDownItemsRequest,
                      context: grpc.ServicerContext) -> catalog_pb2.TakeDownItemsResponse:
        item_ids = list(request.item_ids)
        check_ids(item_ids, self.max_id_length)
        written = self._write(lambda w, catalog, now: take_down(w, catalog, item_ids, now),
                              lambda: write_message(take_down_ids=item_ids), context)
        return catalog_pb2.TakeDownItemsResponse(
            taken_down=written.taken_down if written.log_sequence == 0 else len(item_ids),
            unknown_item_ids=written.unknown, catalog_version=written.catalog_version,
            log_sequence=written.log_sequence)

    def GetItem(self, request: catalog_pb2.GetItemRequest, context: grpc.ServicerContext
                ) -> catalog_pb2.ItemState:
        check_ids([request.item_id], self.max_id_length)
        if not isinstance(self.writer, Writer) or self.store is None:
            raise FailedPrecondition("in log mode the live catalog is kept by the ranking "
                                     "hosts")
        catalog = self.writer.catalogs.live
        row = catalog.item_index.get(request.item_id)
        live = read_items(self.store, [request.item_id]).get(request.item_id)
        if live is None and row is None:
            raise NotFound(f"unknown item {request.item_id!r}")
        version = catalog_version(self.store)
        if live is None:
            assert row is not None
            return catalog_pb2.ItemState(item=to_message(snapshot_item(catalog, row)),
                                         in_snapshot=True, available=True,
                                         model_version=catalog.model_version,
                                         catalog_version=version)
        return catalog_pb2.ItemState(
            item=to_message(live.item), in_snapshot=row is not None, live=row is None,
            taken_down=live.taken_down, available=live.servable(time.time()),
            learned_plays=live.learned_plays,
            model_version=catalog.model_version if row is not None else live.model_version,
            put_at=_stamp(live.put_at), catalog_version=version)

