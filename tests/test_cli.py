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


@pytest.mark.parametrize("argv", [["-v", "subset"], ["subset", "-v"], ["subset"]])
def test_verbose_before_or_after_the_stage(argv: list[str]) -> None:
    args = cli.parser().parse_args(argv)
    assert args.command == "subset" and args.verbose == ("-v" in argv)


def test_stage_help_says_where_its_settings_and_files_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["crop", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "section `crop` of the params file" in text
    assert "2 params rejected or an input missing, 3 a data gate failed" in text
