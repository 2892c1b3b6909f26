"""References: every "METHOD n" / "SPEC n" cited in the code names a section of docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"METHOD": ROOT / "docs" / "method.md", "SPEC": ROOT / "docs" / "design.md"}
CITATION = re.compile(r"\b(METHOD|SPEC)(?: section)? (\d+)")


def sections(path: Path) -> set[str]:
    return set(re.findall(r"^## (\d+)\.", path.read_text(), flags=re.M))


def citations() -> set[tuple[str, str, str]]:
    files = [ROOT / "README.md", *ROOT.glob("layerlie/**/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("benchmarks/*.py")]
    return {(doc, num, str(f.relative_to(ROOT))) for f in files
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
