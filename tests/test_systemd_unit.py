"""systemd/fastproxy.service: the directives the product promises, and `systemd-analyze verify`."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fastproxy.service"
INSTALLED = "/usr/local/bin/fastproxy"


def directives(text: str) -> dict:
    """{(section, key): [values]} of a unit file."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def test_unit_has_the_required_directives():
    d = directives(UNIT.read_text())
    expected = {
        "Type": "notify",
        "ExecStartPre": f"{INSTALLED} -t -c /etc/fastproxy/fastproxy.toml",
        "ExecStart": f"{INSTALLED} -c /etc/fastproxy/fastproxy.toml",
        "KillSignal": "SIGQUIT",
        "KillMode": "mixed",
        "LimitNOFILE": "65536",
        "User": "fastproxy",
        "Group": "fastproxy",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "fastproxy",
        "LogsDirectory": "fastproxy",
        "Restart": "on-failure",
    }
    for key, value in expected.items():
        assert d.get(("Service", key)) == [value], key
    # Check the file (so `systemctl reload` fails visibly on a broken one), then HUP.
    assert d[("Service", "ExecReload")] == [f"{INSTALLED} -t -c /etc/fastproxy/fastproxy.toml",
                                            "/bin/kill -HUP $MAINPID"]
    # A drain takes up to main.shutdown_timeout (30s by default): systemd must wait longer.
    stop = d[("Service", "TimeoutStopSec")][0]
    assert stop.endswith("s") and int(stop[:-1]) > 30
    assert d[("Install", "WantedBy")] == ["multi-user.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point the unit at the command as
    # installed here, or at this Python running the package.
    installed = shutil.which("fastproxy")
    command = installed or f"{sys.executable} -m fastproxy"
    unit = tmp_path / "fastproxy.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, command))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # verify exits 0 even for unknown keys or bad values, which it only prints; lines about
    # other units (the host's own) are not ours to judge.
    ours = [line for line in output.splitlines() if unit.name in line]
    assert result.returncode == 0 and not ours, output
