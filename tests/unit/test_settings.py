"""Service settings from flags and FRESHREC_* environment defaults; the tokens file."""

from __future__ import annotations

from pathlib import Path

import pytest

from event_service.config import Settings as EventSettings
from event_service.writer import WriterConfig
from index.events import Limits
from index.ranking import RankingConfig
from ranking_service.config import Settings as RankingSettings
from rpc.security import load_tokens


def test_flags_override_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_PORT", "6000")
    monkeypatch.setenv("FRESHREC_REFLECTION", "false")
    monkeypatch.setenv("FRESHREC_STATS_MIN_HISTORY", "32")
    settings = EventSettings.from_args(["--data-dir", "/tmp/x", "--max-history", "50"])
    assert (settings.port, settings.reflection, settings.stats_min_history) == (6000, False, 32)
    assert settings.max_history == 50 and settings.data_dir == Path("/tmp/x")
    assert EventSettings.from_args(["--data-dir", "d", "--reflection"]).reflection is True


def test_service_defaults_are_the_domain_defaults() -> None:
    events = EventSettings(data_dir=Path("d"))
    assert events.writer == WriterConfig() and events.limits == Limits()
    assert RankingSettings(data_dir=Path("d")).ranking == RankingConfig()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        EventSettings(data_dir=Path("d"), stats_min_history=0)
    with pytest.raises(ValueError, match="fixed --port"):
        RankingSettings(data_dir=Path("d"), port=0, workers=2)
    with pytest.raises(ValueError, match="mutual TLS"):
        RankingSettings(data_dir=Path("d"), tls_client_ca="ca.pem")
    for bad, match in (({"retrieval": "magic"}, "retrieval must be one of"),
                       ({"blend_weight": 1.5}, "blend_weight must be in"),
                       ({"recent_plays": 0}, "recent_plays must be in"),
                       ({"recent_plays": 5000}, "recent_plays must be in"),
                       ({"recent_half_life_plays": -1.0}, "recent_half_life_plays >= 0")):
        with pytest.raises(ValueError, match=match):
            RankingSettings(data_dir=Path("d"), **bad)  # type: ignore[arg-type]
    assert RankingSettings.from_args(["--data-dir", "d", "--retrieval", "vector",
                                      "--blend-weight", "0.3"]).ranking.blend_weight == 0.3


def test_tokens_file_parsing(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text("# comment\n\nadmin 0123456789abcdef0\nviewer abcdefabcdefabcdef\n")
    assert load_tokens(good) == [(b"0123456789abcdef0", "admin"),
                                 (b"abcdefabcdefabcdef", "viewer")]
    for line in ("root 0123456789abcdef0", "admin short", "admin a b"):
        (tmp_path / "bad").write_text(line + "\n")
        with pytest.raises(ValueError, match="line 1"):
            load_tokens(tmp_path / "bad")
