"""Hostile requests against real servers: every RPC answers OK or a documented status.

Property-based (hypothesis) over every request message of every RPC, against one in-process
event server and one ranking server per module, each over its own copy of the session's
data dir (py-lmdb refuses to open one env twice in a process). Besides the status, each
property checks that a rejected request changed nothing, that the server logged no
unexpected error (`rpc.errors` maps those to UNAVAILABLE, which would hide a crash behind
an allowed status), and that plainly valid requests succeed.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from index import snapshots_dir
from index.catalog import CatalogSnapshot
from index.snapshot import CURRENT
from recsys.v1 import catalog_pb2, events_pb2, ranking_pb2
from tests.integration.conftest import (
    RunningEvents,
    RunningRanking,
    allows,
    event_settings,
    playback,
    ranking_settings,
)

# Examples per RPC (hypothesis max_examples), 2,500 requests in all (plus the explicit
# @example cases): about 12 s for the whole file on a 2-core machine, well under 40 s.
EXAMPLES = {
    "Track": 400,
    "Ingest": 200,
    "IngestStream": 200,
    "GetUser": 200,
    "Recommend": 400,
    "SimilarItems": 350,
    "HomePage": 350,
    "GetCatalogInfo": 100,
    "ReloadCatalog": 300,
}
CALL_TIMEOUT_S = 10.0  # per call, so a stuck stream fails the test instead of hanging it
Code = grpc.StatusCode
DOCUMENTED = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION,
                        Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})
MODEL_VERSION = "small-v1"
GENRES = [f"genre-{g:02d}" for g in range(8)]
PROBE_USER = "zz-bad-input-probe"


def _settings(rpc: str) -> Any:
    return settings(max_examples=EXAMPLES[rpc], deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# -- servers and helpers ---------------------------------------------------------------------


def _copy(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, name: str) -> Path:
    target = tmp_path_factory.mktemp(name) / "data"
    shutil.copytree(data_dir, target)
    return target


@pytest.fixture(scope="module")
def events_server(tmp_path_factory: pytest.TempPathFactory,
                  data_dir: Path) -> Iterator[RunningEvents]:
    """One event server for the module, over its own copy of the data dir."""
    running = RunningEvents(event_settings(_copy(tmp_path_factory, data_dir, "bad-events")))
    yield running
    running.close()


@pytest.fixture(scope="module")
def ranking_server(tmp_path_factory: pytest.TempPathFactory,
                   data_dir: Path) -> Iterator[RunningRanking]:
    """One ranking server for the module, over another copy of the data dir."""
    running = RunningRanking(ranking_settings(_copy(tmp_path_factory, data_dir, "bad-ranking")))
    yield running
    running.close()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.lines.append(f"{record.name}: {text}")


@pytest.fixture(scope="module")
def server_errors() -> Iterator[_Collect]:
    """ERROR records of the freshrec loggers (an unmapped exception is logged there)."""
    handler = _Collect()
    logger = logging.getLogger("freshrec")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class _NoNewErrors:
    def __init__(self, log: _Collect) -> None:
        self.log, self.mark = log, len(log.lines)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        new = self.log.lines[self.mark:]
        assert not new, f"the server logged errors for this request: {new}"


def _call(method: Callable[..., Any], request: Any) -> tuple[Code, Any]:
    """(OK, response) or (status, details); a streaming response is read to its end."""
    try:
        response = method(request, timeout=CALL_TIMEOUT_S)
        if isinstance(response, Iterator):  # a response stream
            response = list(response)
        return Code.OK, response
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _documented(rpc: str, code: Code, details: Any) -> None:
    documented = sorted(c.name for c in DOCUMENTED)
    assert code == Code.OK or code in DOCUMENTED, \
        f"{rpc} answered {code.name} ({details!r}); documented: OK or {documented}"


def _get_user(events: RunningEvents, user_id: str) -> tuple[Code, Any]:
    code, answer = _call(events.stub.GetUser, events_pb2.GetUserRequest(user_id=user_id))
    _documented("GetUser", code, answer)
    return code, answer if code == Code.OK else None


# -- an oracle independent of the implementation ---------------------------------------------


class Verdict(Enum):
    VALID = "valid"  # plainly valid: must be accepted
    INVALID = "invalid"  # plainly bad: must be rejected
    UNSURE = "unsure"  # the contract does not say (exotic unicode, far-off times...)


SAFE_ID = re.compile(r"[A-Za-z0-9._:-]+\Z")


def _worst(verdicts: Sequence[Verdict]) -> Verdict:
    if Verdict.INVALID in verdicts:
        return Verdict.INVALID
    return Verdict.VALID if all(v == Verdict.VALID for v in verdicts) else Verdict.UNSURE


def _id_verdict(value: str, max_bytes: int, control_is_bad: bool = True) -> Verdict:
    if not value or len(value.encode("utf-8")) > max_bytes:
        return Verdict.INVALID
    if any(unicodedata.category(c) == "Cc" for c in value):
        return Verdict.INVALID if control_is_bad else Verdict.UNSURE
    return Verdict.VALID if SAFE_ID.match(value) else Verdict.UNSURE


def _time_verdict(event: events_pb2.PlaybackEvent, now: float, skew: float) -> Verdict:
    if not event.HasField("occurred_at"):
        return Verdict.VALID  # the time of receipt (the proto says so)
    stamp = event.occurred_at
    if not 0 <= stamp.nanos < 1_000_000_000 or stamp.seconds < 0:
        return Verdict.INVALID
    at = stamp.seconds + stamp.nanos / 1e9
    if at > now + skew + 60:
        return Verdict.INVALID
    return Verdict.VALID if now - 20 * 365 * 86_400 <= at <= now + 60 else Verdict.UNSURE


def _event_verdict(event: events_pb2.PlaybackEvent, now: float, events: RunningEvents) -> Verdict:
    limit = events.settings.max_id_length
    fraction = event.watch_fraction
    return _worst([
        _id_verdict(event.event_id, limit), _id_verdict(event.user_id, limit),
        _id_verdict(event.item_id, limit),
        Verdict.VALID if event.type in (1, 2, 3, 4) else Verdict.INVALID,  # the proto's types
        Verdict.VALID if math.isfinite(fraction) and 0.0 <= fraction <= 1.0 else Verdict.INVALID,
        _time_verdict(event, now, events.settings.max_future_skew_s),
    ])


def _filter_verdict(spec: ranking_pb2.Filter) -> Verdict:
    if any(g not in GENRES for g in (*spec.genres_any, *spec.genres_none)):
        return Verdict.INVALID  # FilterError: an unknown genre
    if spec.min_year and spec.max_year and spec.min_year > spec.max_year:
        return Verdict.INVALID  # FilterError: an impossible year range
    if spec.min_year < 0 or spec.max_year < 0:
        return Verdict.UNSURE  # a negative year is not documented either way
    return Verdict.VALID


def _request_verdict(ranking: RunningRanking, id_: str, k: int,
                     spec: ranking_pb2.Filter) -> Verdict:
    k_ok = Verdict.VALID if 1 <= k <= ranking.settings.max_k else Verdict.INVALID
    return _worst([_id_verdict(id_, ranking.settings.max_id_length, control_is_bad=False), k_ok,
                   _filter_verdict(spec)])


# -- strategies ------------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=["Cs"])  # protobuf strings must be valid UTF-8
ascii_word = st.text(st.sampled_from("abcxyz019-_."), min_size=1, max_size=6)
hostile_text = st.one_of(
    st.just(""),
    st.text(ANY_CHAR, min_size=1, max_size=30),
    st.text(ANY_CHAR, min_size=100, max_size=1000),
    st.text(st.characters(categories=["Cc"]), min_size=1, max_size=6),
    st.builds(lambda a, b: f"{a}\x00{b}", ascii_word, ascii_word),
    st.integers(100, 1000).map(lambda n: "x" * n),
    st.sampled_from([
        " ", "x" * 128, "x" * 129, "ü" * 64, "ü" * 65, "€" * 42 + "xx", "€" * 43,
        "\U0001f3ac" * 32, "\U0001f3ac" * 33, "\u200b", "\u2028", "\ufeff", "e\u0301",
        "\U0010ffff", "\u202eevil", "tab\tbed", "line\nbreak", "\x7f", "../../etc/passwd",
    ]),
)
real_users = st.integers(1, 50).map(lambda i: f"u{i}")
real_items = st.integers(0, 1999).map(lambda i: f"i{i}")
user_ids = st.one_of(real_users, real_users, st.sampled_from(["new-a", "new-b", "new-c"]),
                     hostile_text)
item_ids = st.one_of(real_items, real_items, st.sampled_from(["not-in-catalog", "i2000", "i-1"]),
                     hostile_text)
event_types = st.one_of(st.sampled_from([1, 2, 3, 4]),
                        st.sampled_from([0, 5, 7, -1, 2**31 - 1, -(2**31)]))
fractions = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from([0.0, -0.0, 1.0, 5e-324, -5e-324, -1e-9, 1.0000001, -1.0, 2.0, 1e308,
                     math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@dataclass(frozen=True)
class Stamp:
    """occurred_at: unset, relative to the send time, or absolute (hostile) values."""

    kind: str
    seconds: float = 0.0
    nanos: int = 0

    def build(self, now: float) -> Timestamp | None:
        if self.kind == "unset":
            return None
        if self.kind == "relative":
            return Timestamp(seconds=int(now + self.seconds), nanos=self.nanos)
        return Timestamp(seconds=int(self.seconds), nanos=self.nanos)


nanos_ok = st.integers(0, 999_999_999)
stamps = st.one_of(
    st.just(Stamp("unset")),
    st.builds(Stamp, st.just("relative"), st.floats(-10 * 365 * 86_400.0, 0.0), nanos_ok),
    st.builds(Stamp, st.just("relative"), st.floats(0.0, 30.0), nanos_ok),
    st.builds(Stamp, st.just("relative"), st.floats(86_400.0, 1e9), nanos_ok),
    st.builds(Stamp, st.just("absolute"),
              st.sampled_from([-(2**63), -(2**40), -62_135_596_800, -1, 0, 1, 253_402_300_799,
                               2**40, 2**62, 2**63 - 1]),
              st.one_of(nanos_ok, st.sampled_from([-1, 1_000_000_000, 2**31 - 1, -(2**31)]))),
    st.builds(Stamp, st.just("relative"), st.floats(-86_400.0, 0.0),
              st.sampled_from([-1, 1_000_000_000, 2**31 - 1, -(2**31)])),
)


@dataclass(frozen=True)
class EventSpec:
    """A PlaybackEvent to build at send time: ids get a per-example nonce (see `build`)."""

    event_id: tuple[str, str]  # ("pool", name) or ("raw", hostile text)
    user_id: str
    item_id: str
    type: int
    occurred_at: Stamp
    watch_fraction: float

    def build(self, nonce: str, now: float) -> events_pb2.PlaybackEvent:
        # The nonce keeps event ids of different examples apart (hypothesis replays and
        # shrinks examples), so duplicates can only come from within one example.
        kind, raw = self.event_id
        event_id = f"{nonce}-{raw}" if kind == "pool" else (f"{nonce}{raw}" if raw else "")
        event = events_pb2.PlaybackEvent(event_id=event_id, user_id=self.user_id,
                                         item_id=self.item_id, type=self.type,
                                         watch_fraction=self.watch_fraction)
        stamp = self.occurred_at.build(now)
        if stamp is not None:
            event.occurred_at.CopyFrom(stamp)
        return event


event_ids = st.one_of(st.tuples(st.just("pool"), st.sampled_from(["e0", "e1", "e2", "e3"])),
                      st.tuples(st.just("raw"), hostile_text))
event_specs = st.builds(EventSpec, event_ids, user_ids, item_ids, event_types, stamps, fractions)
valid_event_specs = st.builds(
    EventSpec, st.tuples(st.just("pool"), st.sampled_from(["e0", "e1", "e2", "e3"])),
    real_users, real_items, st.sampled_from([1, 2, 3]),
    st.builds(Stamp, st.just("relative"), st.floats(-86_400.0, 0.0), nanos_ok),
    st.floats(0.0, 1.0))
any_event_specs = st.one_of(event_specs, valid_event_specs)

VALID_EVENT = EventSpec(("pool", "e0"), "u7", "i42", 3, Stamp("relative", -5.0, 0), 0.8)

ks = st.one_of(st.integers(1, 20), st.sampled_from([0, 1, 500, 501, 2**31, 2**32 - 1]),
               st.integers(0, 2**32 - 1))
genre_names = st.one_of(st.sampled_from(GENRES), st.sampled_from(GENRES),
                        st.sampled_from(["genre-08", "GENRE-00", "", "genre-00 ", "genre", "\x00"]),
                        hostile_text)
years = st.one_of(st.just(0), st.integers(1900, 2030),
                  st.sampled_from([-1, 1, 9999, -(2**31), 2**31 - 1]),
                  st.integers(-(2**31), 2**31 - 1))
filters = st.one_of(
    st.none(),
    st.builds(ranking_pb2.Filter, genres_any=st.lists(genre_names, max_size=4),
              genres_none=st.lists(genre_names, max_size=4), min_year=years, max_year=years),
    st.builds(ranking_pb2.Filter, genres_any=st.lists(st.sampled_from(GENRES), max_size=3),
              genres_none=st.lists(st.sampled_from(GENRES), max_size=2),
              min_year=st.one_of(st.just(0), st.integers(1940, 2030)),
              max_year=st.one_of(st.just(0), st.integers(1940, 2030))),
)


# -- EventService ----------------------------------------------------------------------------


def _summary(state: tuple[Code, Any]) -> str:
    code, user = state
    if user is None:
        return code.name
    return (f"version {user.version}, history {user.history_size}, "
            f"recent {list(user.recent_item_ids[:3])}")


def _same_user(before: tuple[Code, Any], after: tuple[Code, Any], why: str) -> None:
    assert after == before, \
        f"{why}, yet GetUser changed: {_summary(before)} -> {_summary(after)}"


def _probe(events: RunningEvents) -> None:
    """The server still takes a valid event."""
    event = playback(f"probe-{uuid.uuid4().hex}", PROBE_USER, "i1")
    code, answer = _call(events.stub.Track, events_pb2.TrackRequest(event=event))
    assert code == Code.OK, f"a valid Track after the request failed: {code.name} {answer}"


@_settings("Track")
@given(spec=any_event_specs, again=st.booleans())
@example(spec=VALID_EVENT, again=True)
def test_track_answers_a_documented_status_and_a_rejection_changes_nothing(
    events_server: RunningEvents, catalog: CatalogSnapshot, server_errors: _Collect,
    spec: EventSpec, again: bool,
) -> None:
    events, now = events_server, time.time()
    event = spec.build(uuid.uuid4().hex[:12], now)
    verdict = _event_verdict(event, now, events)
    before = _get_user(events, event.user_id)
    with _NoNewErrors(server_errors):
        code, answer = _call(events.stub.Track, events_pb2.TrackRequest(event=event))
    _documented("Track", code, answer)
    after = _get_user(events, event.user_id)
    if verdict == Verdict.INVALID:
        assert code == Code.INVALID_ARGUMENT, f"bad event {event} answered {code.name}"
    if verdict == Verdict.VALID:
        assert code == Code.OK, f"valid event {event} answered {code.name}: {answer}"
    if code != Code.OK:
        _same_user(before, after, f"Track failed with {code.name}")
        return
    assert not answer.duplicate, "a fresh event_id was reported as a duplicate"
    assert answer.item_known == (event.item_id in catalog.item_index)
    base = before[1].version if before[0] == Code.OK else 0
    assert answer.user_version == base + 1
    assert after[0] == Code.OK and after[1].version == answer.user_version
    if again:
        code, repeat = _call(events.stub.Track, events_pb2.TrackRequest(event=event))
        assert code == Code.OK and repeat.duplicate and repeat.user_version == base + 1
        _same_user(after, _get_user(events, event.user_id), "the repeat was a duplicate")


def _expected_effect(flat: list[events_pb2.PlaybackEvent], rejected: set[int],
                     catalog: CatalogSnapshot) -> tuple[int, int, int, Counter[str],
                                                        dict[str, set[str]]]:
    """accepted, duplicates, unknown items, accepted events per user, their items."""
    seen: set[str] = set()
    accepted = duplicates = unknown = 0
    per_user: Counter[str] = Counter()
    items: dict[str, set[str]] = defaultdict(set)
    for i, event in enumerate(flat):
        if i in rejected:
            continue
        if event.event_id in seen:
            duplicates += 1
            continue
        seen.add(event.event_id)
        accepted += 1
        unknown += event.item_id not in catalog.item_index
        per_user[event.user_id] += 1
        items[event.user_id].add(event.item_id)
    return accepted, duplicates, unknown, per_user, items


def _check_rejections(flat: list[events_pb2.PlaybackEvent], rejections: dict[int, Any],
                      verdicts: list[Verdict]) -> None:
    for index, rejection in rejections.items():
        assert 0 <= index < len(flat), f"rejection index {index} of {len(flat)} events"
        assert rejection.event_id == flat[index].event_id and rejection.reason
    for index, verdict in enumerate(verdicts):
        if verdict == Verdict.INVALID:
            assert index in rejections, f"bad event {flat[index]} was not rejected"
        if verdict == Verdict.VALID:
            assert index not in rejections, \
                f"valid event {flat[index]} rejected: {rejections[index]}"


def _check_users(events: RunningEvents, before: dict[str, tuple[Code, Any]],
                 per_user: Counter[str], items: dict[str, set[str]]) -> None:
    """Versions move by the accepted events only; rejected events never reach a history."""
    for user_id, (code, old) in before.items():
        now = _get_user(events, user_id)
        accepted = per_user[user_id]
        if accepted == 0:
            _same_user((code, old), now, f"no event of user {user_id!r} was accepted")
            continue
        assert now[0] == Code.OK, f"user {user_id!r} got {accepted} events but is {now}"
        base = old.version if code == Code.OK else 0
        assert now[1].version == base + accepted, \
            f"user {user_id!r}: version {base} -> {now[1].version} after {accepted} events"
        known = set(old.recent_item_ids) if code == Code.OK else set()
        leaked = set(now[1].recent_item_ids) - known - items[user_id]
        assert not leaked, f"user {user_id!r}: items of rejected events in history: {leaked}"
        if code == Code.OK and now[1].history_size < events.settings.max_history:
            assert 0 <= now[1].history_size - old.history_size <= len(items[user_id])


@_settings("Ingest")
@given(batches=st.lists(st.lists(any_event_specs, max_size=5), min_size=1, max_size=3))
@example(batches=[[VALID_EVENT, VALID_EVENT], [VALID_EVENT]])
def test_ingest_reports_rejections_and_applies_only_the_good_events(
    events_server: RunningEvents, catalog: CatalogSnapshot, server_errors: _Collect,
    batches: list[list[EventSpec]],
) -> None:
    events, now, nonce = events_server, time.time(), uuid.uuid4().hex[:12]
    messages = [[spec.build(nonce, now) for spec in batch] for batch in batches]
    flat = [event for batch in messages for event in batch]
    before = {e.user_id: _get_user(events, e.user_id) for e in flat}
    with _NoNewErrors(server_errors):
        code, summary = _call(events.stub.Ingest,
                              iter([events_pb2.IngestRequest(events=b) for b in messages]))
    _documented("Ingest", code, summary)
    assert code == Code.OK, f"Ingest of {len(flat)} events failed: {code.name} {summary}"
    rejections = {r.index: r for r in summary.rejections}
    assert summary.rejected == len(summary.rejections) == len(rejections)
    _check_rejections(flat, rejections, [_event_verdict(e, now, events) for e in flat])
    accepted, duplicates, unknown, per_user, items = _expected_effect(flat, set(rejections),
                                                                      catalog)
    assert (summary.accepted, summary.duplicates, summary.unknown_items) == \
        (accepted, duplicates, unknown)
    _check_users(events, before, per_user, items)
    _probe(events)


@_settings("IngestStream")
@given(batches=st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                  st.lists(any_event_specs, max_size=5)), max_size=3))
@example(batches=[(0, [VALID_EVENT]), (0, [VALID_EVENT]), (2**64 - 1, [])])
def test_ingest_stream_acks_every_batch_and_applies_only_the_good_events(
    events_server: RunningEvents, catalog: CatalogSnapshot, server_errors: _Collect,
    batches: list[tuple[int, list[EventSpec]]],
) -> None:
    events, now, nonce = events_server, time.time(), uuid.uuid4().hex[:12]
    requests = [events_pb2.IngestStreamRequest(
        sequence=sequence, events=[spec.build(nonce, now) for spec in specs])
        for sequence, specs in batches]
    flat = [event for request in requests for event in request.events]
    before = {e.user_id: _get_user(events, e.user_id) for e in flat}
    with _NoNewErrors(server_errors):
        code, responses = _call(events.stub.IngestStream, iter(requests))
    _documented("IngestStream", code, responses)
    assert code == Code.OK, f"IngestStream of {len(flat)} events failed: {code.name} {responses}"
    assert [r.sequence for r in responses] == [r.sequence for r in requests]
    rejections: dict[int, Any] = {}
    offset = 0
    for request, response in zip(requests, responses, strict=True):
        batch = {r.index: r for r in response.rejections}  # indices count within the batch
        assert len(batch) == len(response.rejections)
        rejections.update({offset + i: r for i, r in batch.items()})
        offset += len(request.events)
    _check_rejections(flat, rejections, [_event_verdict(e, now, events) for e in flat])
    accepted, duplicates, unknown, per_user, items = _expected_effect(flat, set(rejections),
                                                                      catalog)
    assert (sum(r.accepted for r in responses), sum(r.duplicates for r in responses),
            sum(r.unknown_items for r in responses)) == (accepted, duplicates, unknown)
    _check_users(events, before, per_user, items)
    _probe(events)


@_settings("GetUser")
@given(user_id=st.one_of(real_users, user_ids))
@example(user_id="x" * 1000)
def test_get_user_answers_a_documented_status_and_changes_nothing(
    events_server: RunningEvents, catalog: CatalogSnapshot, server_errors: _Collect,
    user_id: str,
) -> None:
    with _NoNewErrors(server_errors):
        first = _call(events_server.stub.GetUser, events_pb2.GetUserRequest(user_id=user_id))
    _documented("GetUser", *first)
    if not user_id:
        assert first[0] == Code.INVALID_ARGUMENT
    if re.fullmatch(r"u([1-9]|[1-4]\d|50)", user_id):  # bootstrapped from the build
        assert first[0] == Code.OK
    if first[0] == Code.OK:
        user = first[1]
        assert user.user_id == user_id and len(user.vector) in (0, catalog.dim)
        assert user.history_size >= len(user.recent_item_ids)
    second = _call(events_server.stub.GetUser, events_pb2.GetUserRequest(user_id=user_id))
    assert second == first, "GetUser is a read: asking twice must give the same answer"


def _oversized_batch(events: RunningEvents, nonce: str) -> list[events_pb2.PlaybackEvent]:
    """One event more than a message may carry (INVALID_ARGUMENT for the whole call)."""
    return [playback(f"{nonce}-big-{i}", "u13", "i13")
            for i in range(events.settings.max_batch_events + 1)]


def test_an_ingest_refused_as_a_whole_applies_none_of_its_batches(
    events_server: RunningEvents,
) -> None:
    # Ingest answers once; refused with INVALID_ARGUMENT, the client gets no summary and
    # cannot tell what took effect, so nothing may have.
    events, nonce = events_server, uuid.uuid4().hex
    before = {user: _get_user(events, user) for user in ("u12", "u13")}
    good = events_pb2.IngestRequest(events=[playback(f"{nonce}-good", "u12", "i12")])
    big = events_pb2.IngestRequest(events=_oversized_batch(events, nonce))
    code, answer = _call(events.stub.Ingest, iter([good, big]))
    assert code == Code.INVALID_ARGUMENT, f"{code.name}: {answer}"
    for user, state in before.items():
        _same_user(state, _get_user(events, user), "the Ingest call was refused as a whole")


def test_an_ingest_stream_acks_its_good_batches_then_refuses_an_oversized_one(
    events_server: RunningEvents,
) -> None:
    events, nonce = events_server, uuid.uuid4().hex
    before = {user: _get_user(events, user) for user in ("u12", "u13")}
    requests = [events_pb2.IngestStreamRequest(
                    sequence=1, events=[playback(f"{nonce}-good", "u12", "i12")]),
                events_pb2.IngestStreamRequest(sequence=2,
                                               events=_oversized_batch(events, nonce))]
    acks = []
    with pytest.raises(grpc.RpcError) as error:
        for response in events.stub.IngestStream(iter(requests), timeout=CALL_TIMEOUT_S):
            acks.append(response)
    assert error.value.code() == Code.INVALID_ARGUMENT, error.value.details()
    assert [(a.sequence, a.accepted) for a in acks] == [(1, 1)]
    assert _get_user(events, "u12")[1].version == before["u12"][1].version + 1
    _same_user(before["u13"], _get_user(events, "u13"), "its batch was refused")


def test_an_event_without_occurred_at_happened_when_received_as_the_contract_says(
    events_server: RunningEvents,
) -> None:
    # recsys.v1.PlaybackEvent.occurred_at: "Unset: the time the service received it ..."
    event = playback(f"no-time-{uuid.uuid4().hex}", "u8", "i8")
    event.ClearField("occurred_at")
    before = _get_user(events_server, "u8")[1]
    code, answer = _call(events_server.stub.Track, events_pb2.TrackRequest(event=event))
    assert code == Code.OK and answer.occurred_at_defaulted, f"{code.name}: {answer}"
    after = _get_user(events_server, "u8")[1]
    assert after.version == (before.version if before else 0) + 1
    assert after.recent_item_ids[0] == "i8"


# -- RankingService --------------------------------------------------------------------------


def _with_filter(message: Any, spec: ranking_pb2.Filter | None) -> Any:
    if spec is not None:
        message.filter.CopyFrom(spec)
    return message


def _check_items(items: Sequence[ranking_pb2.ScoredItem], k: int, spec: ranking_pb2.Filter,
                 catalog: CatalogSnapshot) -> None:
    ids = [item.item_id for item in items]
    assert len(ids) <= k and len(set(ids)) == len(ids), f"{len(ids)} items for k={k}: {ids}"
    assert all(i in catalog.item_index for i in ids)
    bad = [(item.item_id, list(item.genres), item.year) for item in items
           if not allows(item, spec)]
    assert not bad, f"items outside the filter {spec}: {bad}"


@_settings("Recommend")
@given(user_id=user_ids, k=ks, spec=filters, include_watched=st.booleans())
@example(user_id="u3", k=10, spec=ranking_pb2.Filter(genres_any=["genre-01"]),
         include_watched=False)
@example(user_id="nobody", k=500, spec=None, include_watched=True)
def test_recommend_answers_a_documented_status(
    ranking_server: RunningRanking, catalog: CatalogSnapshot, server_errors: _Collect,
    user_id: str, k: int, spec: ranking_pb2.Filter | None, include_watched: bool,
) -> None:
    request = _with_filter(ranking_pb2.RecommendRequest(user_id=user_id, k=k,
                                                        include_watched=include_watched), spec)
    verdict = _request_verdict(ranking_server, user_id, k, request.filter)
    with _NoNewErrors(server_errors):
        code, answer = _call(ranking_server.stub.Recommend, request)
    _documented("Recommend", code, answer)
    if verdict == Verdict.INVALID:
        assert code == Code.INVALID_ARGUMENT, f"bad {request} answered {code.name}"
    if verdict == Verdict.VALID:  # an unknown user falls back to popularity
        assert code == Code.OK, f"valid {request} answered {code.name}: {answer}"
    if code != Code.OK:
        return
    _check_items(answer.items, k, request.filter, catalog)
    assert answer.model_version == MODEL_VERSION
    record = ranking_server.deps.store.get_user(user_id)
    if record is not None and not include_watched:
        watched = set(record.item_ids) & {item.item_id for item in answer.items}
        assert not watched, f"watched items returned with include_watched=false: {watched}"


@_settings("SimilarItems")
@given(item_id=item_ids, k=ks, spec=filters)
@example(item_id="i42", k=10, spec=ranking_pb2.Filter(min_year=2000))
@example(item_id="not-in-catalog", k=10, spec=None)
def test_similar_items_answers_a_documented_status(
    ranking_server: RunningRanking, catalog: CatalogSnapshot, server_errors: _Collect,
    item_id: str, k: int, spec: ranking_pb2.Filter | None,
) -> None:
    request = _with_filter(ranking_pb2.SimilarItemsRequest(item_id=item_id, k=k), spec)
    verdict = _request_verdict(ranking_server, item_id, k, request.filter)
    known = item_id in catalog.item_index
    with _NoNewErrors(server_errors):
        code, answer = _call(ranking_server.stub.SimilarItems, request)
    _documented("SimilarItems", code, answer)
    if verdict == Verdict.VALID:
        assert code == (Code.OK if known else Code.NOT_FOUND), \
            f"valid {request} answered {code.name}: {answer}"
    if verdict == Verdict.INVALID:
        allowed = {Code.INVALID_ARGUMENT} if known else {Code.INVALID_ARGUMENT, Code.NOT_FOUND}
        assert code in allowed, f"bad {request} answered {code.name}"
    if code != Code.OK:
        return
    assert known, f"SimilarItems of unknown item {item_id!r} succeeded"
    _check_items(answer.items, k, request.filter, catalog)
    assert item_id not in {item.item_id for item in answer.items}


@_settings("HomePage")
@given(user_id=user_ids, k=ks, spec=filters)
@example(user_id="u30", k=8, spec=None)
@example(user_id="u30", k=8, spec=ranking_pb2.Filter(max_year=1960))
def test_home_page_answers_a_documented_status(
    ranking_server: RunningRanking, catalog: CatalogSnapshot, server_errors: _Collect,
    user_id: str, k: int, spec: ranking_pb2.Filter | None,
) -> None:
    request = _with_filter(ranking_pb2.HomePageRequest(user_id=user_id, k_per_row=k), spec)
    verdict = _request_verdict(ranking_server, user_id, k, request.filter)
    with _NoNewErrors(server_errors):
        code, answer = _call(ranking_server.stub.HomePage, request)
    _documented("HomePage", code, answer)
    if verdict == Verdict.INVALID:
        assert code == Code.INVALID_ARGUMENT, f"bad {request} answered {code.name}"
    if verdict == Verdict.VALID:
        assert code == Code.OK, f"valid {request} answered {code.name}: {answer}"
    if code != Code.OK:
        return
    shown = [item.item_id for row in answer.rows for item in row.items]
    assert len(shown) == len(set(shown)), "an item repeated across rows"
    assert len({row.id for row in answer.rows}) == len(answer.rows)
    for row in answer.rows:
        _check_items(row.items, k, request.filter, catalog)


# -- CatalogService --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _unknown_field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(int.from_bytes(payload[:9].ljust(1, b"\0"), "little") % 2**64)
    if wire == 1:
        return key + payload[:8].ljust(8, b"\0")
    if wire == 5:
        return key + payload[:4].ljust(4, b"\0")
    return key + _varint(len(payload)) + payload


unknown_fields = st.lists(st.builds(_unknown_field, st.integers(1, 2**29 - 1),
                                    st.sampled_from([0, 1, 2, 5]), st.binary(max_size=64)),
                          max_size=5).map(b"".join)
catalog_bytes = st.one_of(
    st.just(b""), unknown_fields,
    st.builds(lambda v: catalog_pb2.ReloadCatalogRequest(model_version=v).SerializeToString(),
              hostile_text),
    st.builds(lambda u, k: ranking_pb2.RecommendRequest(user_id=u, k=k).SerializeToString(),
              user_ids, ks),
)


@_settings("GetCatalogInfo")
@given(raw=catalog_bytes)
def test_get_catalog_info_ignores_unknown_fields(
    ranking_server: RunningRanking, catalog: CatalogSnapshot, server_errors: _Collect,
    raw: bytes,
) -> None:
    call = ranking_server.channel.unary_unary(
        "/recsys.v1.CatalogService/GetCatalogInfo", request_serializer=None,
        response_deserializer=catalog_pb2.CatalogInfo.FromString)
    with _NoNewErrors(server_errors):
        code, info = _call(call, raw)
    _documented("GetCatalogInfo", code, info)
    assert code == Code.OK, f"GetCatalogInfo with unknown fields {raw!r}: {code.name} {info}"
    assert (info.model_version, info.dimension, info.item_count) == \
        (MODEL_VERSION, catalog.dim, len(catalog))


HOSTILE_VERSIONS = ["..", "../x", "/etc", "a/b", "CURRENT", ".", "small-v1/..", "small-v1/.",
                    "small-v1\n", "small-v1\x00", " small-v1", "small-v1 ", "small-v2",
                    "x" * 64, "x" * 65, "x" * 1000, "../../../../etc/passwd", "snapshots",
                    "small-v1/manifest.json", "%2e%2e", "..\\x", "C:\\", "~", "-rf",
                    ".tmp-small-v1", "manifest.json", "users.lmdb", "\u2024\u2024"]


@_settings("ReloadCatalog")
@given(version=st.one_of(st.sampled_from(["", MODEL_VERSION]), st.sampled_from(HOSTILE_VERSIONS),
                         hostile_text))
@example(version="..")
@example(version="CURRENT")
@example(version=MODEL_VERSION)
def test_reload_catalog_refuses_hostile_versions_and_keeps_serving(
    ranking_server: RunningRanking, server_errors: _Collect, version: str,
) -> None:
    current = snapshots_dir(ranking_server.settings.data_dir) / CURRENT
    code, before = _call(ranking_server.admin.GetCatalogInfo, catalog_pb2.GetCatalogInfoRequest())
    assert code == Code.OK
    named = current.read_text(encoding="utf-8")
    with _NoNewErrors(server_errors):
        code, info = _call(ranking_server.admin.ReloadCatalog,
                           catalog_pb2.ReloadCatalogRequest(model_version=version))
    _documented("ReloadCatalog", code, info)
    code_after, after = _call(ranking_server.admin.GetCatalogInfo,
                              catalog_pb2.GetCatalogInfoRequest())
    assert code_after == Code.OK
    if version in ("", MODEL_VERSION):
        assert code == Code.OK and info.model_version == MODEL_VERSION, f"{code.name} {info}"
    else:  # there is no other snapshot: anything else must be refused
        assert code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND), \
            f"ReloadCatalog({version!r}) answered {code.name}: {info}"
        assert after.model_version == before.model_version
        assert after.loaded_at == before.loaded_at, "a refused reload swapped the catalog"
        assert current.read_text(encoding="utf-8") == named, "a refused reload moved CURRENT"
        data_dir = ranking_server.settings.data_dir
        assert str(data_dir) not in info and str(data_dir.resolve()) not in info, info
    assert after.model_version == MODEL_VERSION


# -- afterwards ------------------------------------------------------------------------------


def test_both_servers_still_serve_after_the_properties(
    events_server: RunningEvents, ranking_server: RunningRanking, server_errors: _Collect,
) -> None:
    for channel, services in ((events_server.channel, ["recsys.v1.EventService"]),
                              (ranking_server.channel, ["recsys.v1.RankingService",
                                                        "recsys.v1.CatalogService"])):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *services):
            status = health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=CALL_TIMEOUT_S).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
    _probe(events_server)
    code, answer = _call(ranking_server.stub.Recommend,
                         ranking_pb2.RecommendRequest(user_id="u1", k=5))
    assert code == Code.OK and len(answer.items) == 5
    assert not server_errors.lines, f"errors logged during the module: {server_errors.lines}"
