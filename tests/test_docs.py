"""References: every "docs/method.md §n" / "docs/design.md §n" cited in the code names a section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"method": ROOT / "docs" / "method.md", "design": ROOT / "docs" / "design.md"}
CITATION = re.compile(r"docs/(method|design)\.md §(\d+)")
OLD_CITATION = re.compile(r"\b(?:METHOD|SPEC) \d")


def sections(path: Path) -> set[str]:
    return set(re.findall(r"^## (\d+)\.", path.read_text(), flags=re.M))


def sources() -> list[Path]:
    return [ROOT / "README.md", *ROOT.glob("layerlie/**/*.py"), *ROOT.glob("tests/*.py"),
            *ROOT.glob("benchmarks/*.py"), *ROOT.glob("notebooks/*.ipynb")]


def citations() -> set[tuple[str, str, str]]:
    return {(doc, num, str(f.relative_to(ROOT))) for f in sources()
            for doc, num in CITATION.findall(f.read_text())}


def test_every_citation_names_a_section() -> None:
    have = {doc: sections(path) for doc, path in DOCS.items()}
    cited = citations()
    assert len({(d, n) for d, n, _ in cited}) >= 10  # the code does cite both documents
    missing = sorted(c for c in cited if c[1] not in have[c[0]])
    assert not missing, f"cited sections missing from docs/: {missing}"


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_sections_are_numbered_in_order(doc: str) -> None:
    nums = [int(n) for n in re.findall(r"^## (\d+)\.", DOCS[doc].read_text(), flags=re.M)]
    assert nums == list(range(1, len(nums) + 1))


def test_citations_name_the_file() -> None:
    """A bare "METHOD 3" names a document the reader of the repository does not have."""
    bare = [str(f.relative_to(ROOT)) for f in sources()
            if f.name != "test_docs.py" and OLD_CITATION.search(f.read_text())]
    assert not bare, f"cite docs/method.md §n or docs/design.md §n instead: {bare}"
