"""``fedlora keys``: docs/cli.md's key table is ``fedlora keys --markdown``,
every key with a fixed set of values lists it (``strategy`` included), and
``simulate --help`` points to it."""

from __future__ import annotations

import re
from pathlib import Path

from fedlora.commands import keytable
from fedlora.commands.cli import main
from fedlora.core.config import KEYS
from fedlora.strategies import strategies, strategy_keys

CLI_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
BEGIN = "<!-- fedlora keys --markdown (tests/commands/test_keytable.py keeps them equal) -->\n"
END = "<!-- end of fedlora keys --markdown -->"


def test_the_guide_table_is_what_keys_markdown_prints(capsys):
    text = CLI_GUIDE.read_text()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert main(["keys", "--markdown"]) == 0
    assert capsys.readouterr().out == table, "run `fedlora keys --markdown` into docs/cli.md"


def _row(markdown: str, key: str, strategy: str | None = None) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == f"`{key}`" and (strategy is None or cells[1] == f"`{strategy}`"):
            return cells
    raise AssertionError(f"no row for {key}")


def test_every_key_is_in_the_table_with_its_choices():
    table = keytable.markdown()
    for key in KEYS:
        _row(table, key)
    assert _row(table, "optimizer")[3] == "`adamw`, `sgd`"
    assert _row(table, "dp")[3] == "`off`, `local`, `central`"
    choices = _row(table, "strategy")[3]
    for built_in in ("fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora", "flexlora",
                     "flora", "fedex"):
        assert f"`{built_in}`" in choices
    assert _row(table, "cellm-server-optimizer", "cellm")[4] == "`sgd`, `adam`"
    assert _row(table, "client-ranks", "hetlora")[2] == "str"
    # a "|" inside a help text is escaped: every row has its header's cells
    widths = [len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines()
              if line.startswith("|")]
    assert set(widths) == {7, 8}  # 5 and 6 cells between the outer bars


def test_the_plain_listing_names_every_installed_strategy(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("strategy "))
    for name in strategies():
        assert name in line.split("one of:")[1]
    for keys in strategy_keys().values():
        for key in keys:
            assert f"  {key}" in out


def test_simulate_help_points_to_keys(capsys):
    try:
        main(["simulate", "--help"])
    except SystemExit as done:
        assert done.code == 0
    assert "`fedlora keys`" in capsys.readouterr().out
