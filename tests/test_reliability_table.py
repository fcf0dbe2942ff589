"""The README's reliability table is exactly what the fault tests recorded."""

from __future__ import annotations

from reliability_table import README, load, readme_table, render


def test_readme_table_is_the_rendered_one() -> None:
    """Run ``python -m tests.reliability_table --write`` after the fault tests if this fails."""
    assert load(), "tests/reliability.json has no rows: run the fault tests"
    assert readme_table(README.read_text()) == render(load())


def test_a_changed_row_shows() -> None:
    rows = load()
    key = next(iter(rows))
    changed = {**rows, key: {**rows[key], "outcome": rows[key]["outcome"] + " (changed)"}}
    assert render(changed) != render(rows)
