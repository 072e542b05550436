"""The `mcf` shell: every stage is a subcommand, and tools get their arguments untouched."""

from __future__ import annotations

import pytest

from mcf import cli
from mcf.params import SECTIONS


def test_every_params_section_is_a_stage_command() -> None:
    assert set(cli.STAGES) == set(SECTIONS)


def test_tool_receives_its_options_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda argv: seen.append(argv) or 0)
    assert cli.main(["-v", "export", "--checkpoint", "a.pt", "--out", "b"]) == 0
    assert seen == [["--checkpoint", "a.pt", "--out", "b"]]
