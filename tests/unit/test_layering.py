"""The import directions of DESIGN.md, checked on the source: HQ cannot touch a credential because
it has no code that could, and nothing below the CLI imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "outpost"


def imports_of(path: Path) -> set[str]:
    """Every outpost module PATH imports, at any depth (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "outpost" or name.startswith("outpost.")}


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("hq"), ids=lambda p: str(p.relative_to(SRC)))
def test_hq_never_imports_agent_internals(path: Path) -> None:
    forbidden = ("state", "drivers", "credentials", "api", "link", "jobs", "pooler", "cli")
    bad = sorted(
        name
        for name in imports_of(path)
        if any(name == f"outpost.{f}" or name.startswith(f"outpost.{f}.") for f in forbidden)
    )
    assert bad == [], f"{path.relative_to(SRC)} imports {bad}"


def test_nothing_below_the_cli_imports_it() -> None:
    offenders = {
        str(path.relative_to(SRC)): sorted(
            n for n in imports_of(path) if n.startswith("outpost.cli")
        )
        for path in SRC.rglob("*.py")
        if "cli" not in path.relative_to(SRC).parts and path.name != "__main__.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_hq_check_sees_the_hq_package() -> None:
    assert {"app.py", "dispatch.py", "db.py"} <= {p.name for p in modules("hq")}
