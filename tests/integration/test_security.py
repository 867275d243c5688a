"""TLS, mutual TLS and token roles on both servers, through real handshakes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.client import Client, Tls
from recsys.v1 import catalog_pb2, catalog_pb2_grpc, events_pb2, ranking_pb2, ranking_pb2_grpc
from tests.integration.conftest import (
    RunningEvents,
    RunningRanking,
    event_settings,
    playback,
    ranking_settings,
    status_of,
)

TOKENS = {"viewer": "viewer-token-0123456789", "ingest": "ingest-token-0123456789",
          "admin": "admin-token-0123456789"}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(d / "san.ext"), "-out", str(d / f"{name}.pem"))
    (d / "tokens").write_text("# role token\n" + "".join(f"{r} {t}\n" for r, t in
                                                         TOKENS.items()))
    return d


def _channel(port: int, pki: Path, client_cert: bool = False) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def _auth(role: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[role]}")]


def test_ranking_roles_over_tls(fresh_data_dir: Path, pki: Path) -> None:
    running = RunningRanking(ranking_settings(
        fresh_data_dir, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        tokens_file=str(pki / "tokens")))
    try:
        assert running.server.mode == "TLS, auth on"
        with _channel(running.port, pki) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            admin = catalog_pb2_grpc.CatalogServiceStub(channel)
            request = ranking_pb2.RecommendRequest(user_id="u1", k=3)
            reload = catalog_pb2.ReloadCatalogRequest()
            assert status_of(stub.Recommend, request) == grpc.StatusCode.UNAUTHENTICATED
            assert status_of(stub.Recommend, request, metadata=[
                ("authorization", "Bearer not-a-token")]) == grpc.StatusCode.UNAUTHENTICATED
            assert status_of(stub.Recommend, request,
                             metadata=_auth("viewer")) == grpc.StatusCode.OK
            assert status_of(admin.ReloadCatalog, reload,
                             metadata=_auth("viewer")) == grpc.StatusCode.PERMISSION_DENIED
            assert status_of(admin.ReloadCatalog, reload,
                             metadata=_auth("ingest")) == grpc.StatusCode.PERMISSION_DENIED
            assert status_of(admin.ReloadCatalog, reload, metadata=_auth("admin")) == \
                grpc.StatusCode.OK
            health = health_pb2_grpc.HealthStub(channel)  # stays open to probes
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        running.close()


def test_event_writes_need_the_ingest_role(fresh_data_dir: Path, pki: Path) -> None:
    running = RunningEvents(event_settings(fresh_data_dir, tokens_file=str(pki / "tokens")))
    try:
        track = events_pb2.TrackRequest(event=playback("sec-1", "u1", "i1"))
        stub = running.stub
        assert status_of(stub.Track, track) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(stub.Track, track, metadata=_auth("viewer")) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert status_of(stub.Track, track, metadata=_auth("ingest")) == grpc.StatusCode.OK
        assert status_of(stub.GetUser, events_pb2.GetUserRequest(user_id="u1"),
                         metadata=_auth("viewer")) == grpc.StatusCode.OK
        stream = stub.IngestStream(iter([events_pb2.IngestStreamRequest(sequence=1)]),
                                   metadata=_auth("viewer"))
        assert status_of(list, stream) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.close()


def test_catalog_writes_need_the_admin_role(fresh_data_dir: Path, pki: Path) -> None:
    running = RunningEvents(event_settings(fresh_data_dir, tokens_file=str(pki / "tokens")))
    try:
        items = catalog_pb2_grpc.ItemServiceStub(running.channel)
        put = catalog_pb2.PutItemsRequest(items=[catalog_pb2.CatalogItem(item_id="n1",
                                                                         title="New")])
        down = catalog_pb2.TakeDownItemsRequest(item_ids=["i1"])
        for role in ("viewer", "ingest"):
            assert status_of(items.PutItems, put, metadata=_auth(role)) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert status_of(items.TakeDownItems, down, metadata=_auth(role)) == \
                grpc.StatusCode.PERMISSION_DENIED
        assert status_of(items.PutItems, put) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(items.PutItems, put, metadata=_auth("admin")) == grpc.StatusCode.OK
        assert status_of(items.GetItem, catalog_pb2.GetItemRequest(item_id="n1"),
                         metadata=_auth("viewer")) == grpc.StatusCode.OK
    finally:
        running.close()


def test_mutual_tls_requires_a_client_certificate(fresh_data_dir: Path, pki: Path) -> None:
    running = RunningRanking(ranking_settings(
        fresh_data_dir, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem")))
    try:
        request = ranking_pb2.RecommendRequest(user_id="u1", k=3)
        with _channel(running.port, pki) as channel:  # handshake fails: no client cert
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert status_of(stub.Recommend, request, timeout=5) == grpc.StatusCode.UNAVAILABLE
        with _channel(running.port, pki, client_cert=True) as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            assert len(stub.Recommend(request, timeout=5).items) == 3
    finally:
        running.close()


def test_reflection_can_be_turned_off(fresh_data_dir: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    running = RunningRanking(ranking_settings(fresh_data_dir, reflection=False))
    try:
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(running.channel).get_services()
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.close()


def test_half_configured_tls_is_refused(fresh_data_dir: Path, pki: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        ranking_settings(fresh_data_dir, tls_cert=str(pki / "server.pem"))


def test_the_client_speaks_mutual_tls_with_a_token(fresh_data_dir: Path, pki: Path) -> None:
    running = RunningRanking(ranking_settings(
        fresh_data_dir, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"), tokens_file=str(pki / "tokens")))
    target = f"127.0.0.1:{running.port}"
    tls = Tls(ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key")
    try:
        with Client("127.0.0.1:1", target, tls=tls, token=TOKENS["viewer"]) as client:
            assert len(client.recommend("u1", k=3).items) == 3
        with Client("127.0.0.1:1", target, tls=tls, token="not-a-token") as client:
            assert status_of(client.recommend, "u1") == grpc.StatusCode.UNAUTHENTICATED
        with Client("127.0.0.1:1", target, tls=Tls(ca=pki / "ca.pem"),
                    token=TOKENS["viewer"], deadline_s=2) as client:
            assert status_of(client.recommend, "u1") == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ValueError, match="needs TLS"):
            Client("127.0.0.1:1", target, token=TOKENS["viewer"])
    finally:
        running.close()
