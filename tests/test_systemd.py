"""systemd/neod.service: the settings operations rely on; `systemd-analyze verify` if present."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "neod.service"


def service_settings() -> dict[str, list[str]]:
    """[Service] keys to their values (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_has_the_required_settings() -> None:
    s = service_settings()
    required = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "neod",
                "LimitMEMLOCK": "infinity", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "PrivateTmp": "yes", "RuntimeDirectory": "neod",
                "StateDirectory": "neod", "CacheDirectory": "neod", "DevicePolicy": "closed",
                "KillSignal": "SIGTERM", "KillMode": "mixed"}
    for key, value in required.items():
        assert s.get(key) == [value], key
    assert int(s["WatchdogSec"][0]) >= 30
    assert all("nvidia" in rule for rule in s["DeviceAllow"])
    assert "--config /etc/neod/neod.toml" in s["ExecStart"][0]
    # the stop timeout leaves room for the default grace period (30 s) plus flushing
    assert int(s["TimeoutStopSec"][0]) > 30
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # The installed binary is not here: point ExecStart at this interpreter, keep everything else.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/neod",
                                    f"ExecStart={sys.executable} -m neod")
    unit = tmp_path / "neod.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # unknown keys are only warnings: none allowed
