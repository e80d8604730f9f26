"""Where the third-party corpus lives, and a skip when it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / ".." / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus not present")
    return CORPUS.resolve()


def corpus_files(pattern: str) -> list[Path]:
    """Corpus files matching a glob, for parametrising (empty when the corpus is absent)."""
    if not CORPUS.is_dir():
        return []
    return sorted(CORPUS.resolve().glob(pattern))


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]
