"""What the systemd units, the Dockerfile and the sample config must say.

There is no systemd or Docker engine on the test machines, so these check the files' content;
the sample configs are validated by the real loader.
"""

from __future__ import annotations

import configparser
import json
import shlex
from pathlib import Path

import pytest

from outpost.cli.main import cli
from outpost.config import load_config

ROOT = Path(__file__).parents[2]
PACKAGING = ROOT / "packaging"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(PACKAGING / "systemd" / name)
    return parser


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("outpost-agent.service", "/etc/outpost/agent.json"),
        ("outpost-agent@.service", "/etc/outpost/agent-%i.json"),
    ],
)
def test_systemd_units(name: str, config: str) -> None:
    u = unit(name)
    service = u["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv == ["/usr/bin/outpost", "--config", config, "serve"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["User"] == "outpost"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert "/var/lib/outpost" in service["ReadWritePaths"]
    assert u["Install"]["WantedBy"] == "multi-user.target"
    # the command line the unit runs is one the CLI accepts
    ctx = cli.make_context("outpost", argv[1:], resilient_parsing=True)
    assert ctx.params["config_path"] == config


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in (PACKAGING / "docker" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    volume = next(line for line in lines if line.startswith("VOLUME "))
    assert json.loads(volume.removeprefix("VOLUME ")) == ["/var/lib/outpost"]
    entry = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert json.loads(entry.removeprefix("ENTRYPOINT "))[0] == "outpost"  # exec form
    cmd = next(line for line in lines if line.startswith("CMD "))
    assert json.loads(cmd.removeprefix("CMD ")) == ["serve"]


@pytest.mark.parametrize("path", ["agent.json", "docker/agent.json"])
def test_sample_configs_validate(path: str, clean_env: Path) -> None:
    loaded = load_config(str(PACKAGING / path))
    assert loaded.config.data_dir.is_absolute()
