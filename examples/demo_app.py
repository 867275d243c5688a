"""A page a person can look at: a user's home page rows, with titles and reasons, and on
every title "Watched" and "Not interested"; the rows change as soon as the event is acked.

    make serve     # in one terminal: both services
    make demo      # in another; then open http://127.0.0.1:8080/?user=alice

It uses only the Python client (`freshrec.client`): a click is a Track; the page after
it is a HomePage read with `min_user_version` set to the version Track answered, so it
shows the write without sleeping.
"""

from __future__ import annotations

import argparse
import html
import signal
import sys
import threading
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from freshrec.client import Client
from recsys.v1 import events_pb2, ranking_pb2

TYPES = {"watched": events_pb2.PLAY_COMPLETE, "not_interested": events_pb2.NOT_INTERESTED}
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;background:#111;color:#eee}
h2{margin:1.2em 0 .4em;font-size:1.1em}ol{list-style:none;padding:0;display:flex;gap:.8em;
flex-wrap:wrap}li{background:#222;border-radius:6px;padding:.6em;width:13em}
.title{display:block;font-weight:600}.reason{display:block;color:#9ab;font-size:.85em;
margin:.3em 0}.meta{color:#888}button{margin:.2em .2em 0 0;font-size:.8em}"""


def _page(user: str, home: ranking_pb2.HomePageResponse) -> str:
    rows = []
    for row in home.rows:
        items = "".join(
            f'<li class="item" data-item="{html.escape(i.item_id)}">'
            f'<span class="title">{html.escape(i.title)}</span>'
            f'<span class="meta">{html.escape(", ".join(i.genres))} {i.year or ""}</span>'
            f'<span class="reason">{html.escape(i.reason.text)}</span>'
            '<form method="post" action="/event">'
            f'<input type="hidden" name="user" value="{html.escape(user)}">'
            f'<input type="hidden" name="item" value="{html.escape(i.item_id)}">'
            '<button name="type" value="watched">Watched</button>'
            '<button name="type" value="not_interested">Not interested</button></form></li>'
            for i in row.items)
        rows.append(f'<section class="row" data-row="{html.escape(row.id)}">'
                    f"<h2>{html.escape(row.title)}</h2><ol>{items}</ol></section>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>freshrec: '
            f"{html.escape(user)}</title><style>{STYLE}</style></head><body>"
            f'<h1>Home page of <span id="user">{html.escape(user)}</span></h1>'
            f'<p class="meta" id="state">user version {home.user_version}, model '
            f"{html.escape(home.model_version)}</p>{''.join(rows)}</body></html>")


def handler(client: Client) -> type[BaseHTTPRequestHandler]:
    """The request handler, over one client."""

    class Demo(BaseHTTPRequestHandler):
        def _send(self, status: int, body: str, location: str | None = None) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            if location is not None:
                self.send_header("Location", location)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _failed(self, error: grpc.RpcError) -> None:
            self._send(HTTPStatus.BAD_GATEWAY, f"<h1>{error.code().name}</h1>"
                       f"<p>{html.escape(error.details() or '')}</p>")

        def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
            url = urllib.parse.urlparse(self.path)
            if url.path != "/":
                self._send(HTTPStatus.NOT_FOUND, "<h1>not found</h1>")
                return
            query = urllib.parse.parse_qs(url.query)
            user = query.get("user", ["alice"])[0]
            version = int(query.get("v", ["0"])[0] or 0)
            try:
                home = client.home_page(user, k_per_row=6, min_user_version=version)
            except grpc.RpcError as error:
                self._failed(error)
                return
            self._send(HTTPStatus.OK, _page(user, home))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8"))
            user, item = form.get("user", [""])[0], form.get("item", [""])[0]
            kind = TYPES.get(form.get("type", [""])[0])
            if self.path != "/event" or not user or not item or kind is None:
                self._send(HTTPStatus.BAD_REQUEST, "<h1>bad request</h1>")
                return
            try:
                ack = client.track(f"demo-{uuid.uuid4().hex}", user, item, type=kind)
            except grpc.RpcError as error:
                self._failed(error)
                return
            where = "/?" + urllib.parse.urlencode({"user": user, "v": ack.user_version})
            self._send(HTTPStatus.SEE_OTHER, "", location=where)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the services log what matters

    return Demo


def main(argv: list[str] | None = None) -> int:
    """Serve the demo page until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default="localhost:50051", help="event service target")
    parser.add_argument("--ranking", default="localhost:50052", help="ranking service target")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    args = parser.parse_args(argv)
    with Client(args.events, args.ranking, deadline_s=5.0) as client:
        server = ThreadingHTTPServer((args.host, args.port), handler(client))
        host, port = server.server_address[:2]
        # SIGTERM or Ctrl-C ends serve_forever from another thread: a clean exit.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
        print(f"demo page on {host}:{port} (http://{host}:{port}/?user=alice; Ctrl-C stops)",
              file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
