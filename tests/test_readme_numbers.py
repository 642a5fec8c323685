"""The README's headline table is the committed bundle's own evaluation.

After a rebuild, ``python -m tools.headline_table`` prints the table to paste; until then
this fails, so the README cannot advertise numbers of an older bundle.
"""

from __future__ import annotations

from pathlib import Path

from scoring.bundle import load_bundle
from tools.headline_table import COLUMNS, ROWS, headline_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_holds_the_default_bundles_headline_table(bundle_dir: Path) -> None:
    service_level = load_bundle(bundle_dir).evaluation()["service_level"]
    table = headline_table(service_level)
    # header, rule, one line a score, the best single input
    assert len(table.splitlines()) == len(ROWS) + 3
    assert all(title in table for _, title in COLUMNS)
    assert table in README.read_text(), (
        "README.md's headline table is not the default bundle's: paste the output of "
        "`python -m tools.headline_table` into the section 'The default bundle'"
    )
