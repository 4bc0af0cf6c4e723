"""The ``raddino`` entry point: every sub-command in COMMANDS is registered and listed in the help."""

from __future__ import annotations

import re

import pytest

from raddino.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert {"viz", "plot"} <= set(COMMANDS)
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\b", text, flags=re.MULTILINE), name
