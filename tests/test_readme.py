"""The README's claims that point at tests: every test its Reliability table names exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_reliability_table_names_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Reliability"):readme.index("\n## ", readme.index("## Reliability") + 1)]
    named = set(re.findall(r"`(test_\w+)`", table))
    assert len(named) > 20, "the table names its tests in backticks"
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    assert not named - defined, f"README names tests that do not exist: {sorted(named - defined)}"
