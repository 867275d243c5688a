"""The one error boundary: every domain error has a status, bugs are INTERNAL, no paths leak."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import event_service
import index
import ranking_service
import rpc
from index.errors import FreshrecError
from index.store import StoreFullError
from recsys.v1 import events_pb2, ranking_pb2
from rpc.errors import INTERNAL_MESSAGE, REDACTED, ErrorBoundary, status_for
from tests.integration.conftest import RunningEvents, RunningRanking, playback


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_domain_error_has_a_status_code() -> None:
    for package in (index, event_service, ranking_service, rpc):
        for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    errors = list(_subclasses(FreshrecError))
    assert len(errors) >= 10  # the categories and the errors raised as them
    for error in errors:
        code = status_for(error("x"))
        assert code not in (None, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error
    assert status_for(RuntimeError("a bug")) is None


def test_messages_lose_the_servers_paths(tmp_path: Path) -> None:
    boundary = ErrorBoundary([tmp_path / "data"])
    store = tmp_path / "data" / "users.lmdb"
    assert boundary.scrub(str(StoreFullError(f"{store}: the store is full"))) == \
        f"{REDACTED}/users.lmdb: the store is full"
    assert boundary.scrub(f"{store.resolve()} and {store}") == \
        f"{REDACTED}/users.lmdb and {REDACTED}/users.lmdb"


def _bug(*_: object, **__: object) -> None:
    raise RuntimeError("deterministic bug near /srv/secret/path")


def test_a_bug_in_a_unary_handler_is_internal_and_logged(
    ranking: RunningRanking, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ranking.deps.ranker, "recommend", _bug)
    with caplog.at_level(logging.ERROR, logger="freshrec.rpc"):
        with pytest.raises(grpc.RpcError) as error:
            ranking.stub.Recommend(ranking_pb2.RecommendRequest(user_id="u1", k=5))
    assert error.value.code() == grpc.StatusCode.INTERNAL  # not retryable, unlike UNAVAILABLE
    assert error.value.details() == INTERNAL_MESSAGE
    assert any("deterministic bug" in r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert ranking.stub.SimilarItems(ranking_pb2.SimilarItemsRequest(item_id="i3", k=2)).items


def test_a_bug_in_a_streaming_handler_is_internal(
    events: RunningEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events.deps.writer, "submit", _bug)
    stream = events.stub.IngestStream(iter([events_pb2.IngestStreamRequest(
        sequence=1, events=[playback("bug-1", "u1", "i1")])]))
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (error.value.details() or "")
