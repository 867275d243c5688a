"""The package as a user installs it: a wheel built from a fresh clone, in a fresh venv,
its console scripts serving, driven by the client it ships."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from bench.services import start_command, stop

REPO = Path(__file__).resolve().parents[2]
PROTOS = ("events", "ranking", "catalog")

DRIVE = """
import json, sys
from freshrec import client as module
from freshrec.client import Client, playback
from recsys.v1 import events_pb2, ranking_pb2
with Client(sys.argv[1], sys.argv[2], deadline_s=30) as client:
    track = client.track("e1", "wheel-user", sys.argv[3])
    with client.event_stream() as stream:
        stream.send([playback("e2", "wheel-user", sys.argv[4])])
    answer = client.recommend("wheel-user", k=5, min_user_version=2)
print(json.dumps({"stubs": events_pb2.__file__, "client": module.__file__,
                  "version": track.user_version, "defaulted": track.occurred_at_defaulted,
                  "streamed": stream.acked.accepted, "seen": answer.user_version,
                  "source": ranking_pb2.Source.Name(answer.source),
                  "items": [i.item_id for i in answer.items]}))
"""


def test_a_wheel_from_a_fresh_clone_installs_and_serves(tmp_path: Path) -> None:
    clone, dist, venv, data = (tmp_path / n for n in ("clone", "dist", "venv", "data"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert not list((clone / "recsys" / "v1").glob("*_pb2*.py"))  # the stubs are not committed
    # No build isolation: the build requirements (setuptools, grpcio-tools) are installed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(clone)], check=True,
                   cwd=tmp_path)
    (wheel,) = dist.glob("freshrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for proto in PROTOS:
        assert {f"recsys/v1/{proto}_pb2.py", f"recsys/v1/{proto}_pb2.pyi",
                f"recsys/v1/{proto}_pb2_grpc.py", f"recsys/v1/{proto}.proto"} <= names

    # A fresh venv with the wheel and nothing of the checkout; its third-party packages
    # are this environment's (one line of .pth), so the test downloads nothing.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "third_party.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bin_dir = venv / "bin"
    subprocess.run([bin_dir / "freshrec-index", "build", "--dataset", "synthetic",
                    "--n-items", "300", "--n-users", "60", "--factors", "8", "--data-dir",
                    str(data)], check=True, cwd=tmp_path, env=env, capture_output=True)
    events, events_port = start_command(
        [str(bin_dir / "freshrec-events"), "--data-dir", str(data), "--port", "0"], env)
    procs = [events]
    try:
        ranking, ranking_port = start_command(
            [str(bin_dir / "freshrec-ranking"), "--data-dir", str(data), "--port", "0",
             "--workers", "1"], env)
        procs.append(ranking)
        items = next((data / "snapshots").glob("*/item_ids.txt")).read_text().split()
        out = subprocess.run([python, "-c", DRIVE, f"127.0.0.1:{events_port}",
                              f"127.0.0.1:{ranking_port}", *items[:2]], check=True,
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        codes = stop(procs, signal.SIGTERM)
    drove = json.loads(out.stdout)
    assert Path(drove["stubs"]).is_relative_to(venv), drove["stubs"]
    assert Path(drove["client"]).is_relative_to(venv), drove["client"]
    assert drove["version"] == 1 and drove["defaulted"]
    assert drove["streamed"] == 1 and drove["seen"] == 2
    assert drove["source"] == "PERSONALIZED" and len(drove["items"]) == 5
    assert codes == [0, 0]
