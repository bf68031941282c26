"""Fixtures of the schema migration tests: an empty database on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import POSTGRES, postgres_schema

from kms import store


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kms.db'}"
        return
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set")
    with postgres_schema() as pg:
        yield pg


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    made = store.make_engine(url)
    yield made
    made.dispose()
