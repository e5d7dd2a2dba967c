"""The README and docs/ render: every table is whole (a header, a separator, rows with as many
cells), the README stays under 200 lines, and every relative link points at a file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def table_problems(text: str) -> list:
    """Tables as markdown renders them: a run of '|' lines outside code fences."""
    problems, table, fenced = [], [], False
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            table.append((n, line))
            continue
        if table:
            (first, header), *rest = table
            if not rest or not re.fullmatch(r"\|( *:?-+:? *\|)+", rest[0][1].strip()):
                problems.append(f"line {first}: table rows without a header and separator")
            for m, row in rest:
                if cells(row) != cells(header):
                    problems.append(f"line {m}: {cells(row)} cells, the header has {cells(header)}")
            table = []
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_tables_render_and_links_resolve(page):
    text = page.read_text()
    assert table_problems(text) == []
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200
    commands = [l for l in lines[:6] if "pip install" in l]
    assert commands[0].endswith("mlx-sleep demo") and commands[1].endswith("python -m pytest -q")


def test_the_checker_finds_a_split_table():
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n")
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")
    assert not table_problems("| a | b |\n|---|---|\n| 1 | 2 |\n")
