"""The read API as a real process, and a fresh pair of companies per test, so that every test
can check what one company sees of the other."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.api.world import World, new_company


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


@pytest.fixture
async def world(db: asyncpg.Connection) -> World:
    """Company X and company Y, each with two users and its own conversations."""
    return World(await new_company(db), await new_company(db))
