"""The documentation points at things that exist.

Every relative link in README.md and docs/*.md must name an existing file or folder, and a
``#fragment`` must name a heading of the target page (GitHub's anchor rules). Every file and
function that docs/architecture.md's stage table names must exist, so the map of the
pipeline cannot silently go stale when code moves. The README's paper table and demo summary
are what ``python -m examples.paper_table`` and ``make demo`` print.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(without_code_blocks(page.read_text())):
        slug = anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(without_code_blocks(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_anchor_follows_github() -> None:
    assert anchor("Squeezing SRResNet's 9x9 output conv") == "squeezing-srresnets-9x9-output-conv"
    assert anchor("The sub-pixel study: why the guard exists") == (
        "the-sub-pixel-study-why-the-guard-exists")
    assert anchor("What a matcher can see (`Site`)") == "what-a-matcher-can-see-site"


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [bad](missing.md)\n```\n[code](x.md)\n```\n")
    assert relative_links(page) == ["page.md#title", "missing.md"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def stage_table() -> list[tuple[str, list[str]]]:
    """(file, key names) for each row of docs/architecture.md's stage table."""
    rows = []
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].startswith("`lwcompile/"):
            rows.append((cells[2].strip("`"), re.findall(r"`([A-Za-z_]\w*)`", cells[3])))
    return rows


def test_architecture_names_exist() -> None:
    rows = stage_table()
    assert len(rows) >= 20
    missing = []
    for file, names in rows:
        source = ROOT / file
        if not source.is_file():
            missing.append(f"{file}: no such file")
            continue
        text = source.read_text()
        assert names, f"{file}: the row names no function"
        for name in names:
            if not re.search(rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]", text, re.M):
                missing.append(f"{file}: no {name}")
    assert not missing, "; ".join(missing)


@pytest.mark.slow  # lightens the four reference networks
def test_readme_paper_table_is_what_paper_table_prints(capsys: pytest.CaptureFixture) -> None:
    """The README's table rows are exactly ``python -m examples.paper_table``'s output."""
    from examples import paper_table

    paper_table.main()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index("| network | params before -> after | MACs before -> after (example "
                         "input) | rules that fired | paper (params) |")
    rows = readme[start + 2:start + 2 + len(printed[1:])]
    assert rows == printed[1:]


def test_readme_demo_summary_is_what_demo_prints() -> None:
    """The summary line of the README's ``make demo`` output is the report's own."""
    import lwcompile
    from examples import dncnn

    report = lwcompile.lighten(dncnn.build()).lwcompile_report
    summary = str(report).splitlines()[-1]
    assert summary.startswith("15 rewritten, 2 kept")
    assert summary in (ROOT / "README.md").read_text()
