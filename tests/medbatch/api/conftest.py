"""The real API server (`medbatch serve`, a subprocess on a free port) over the session's real
stack, and tokens of each scope."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import select

from core.job_kinds import JobKind
from core.settings import Settings, settings_env
from db.jobs import transition
from db.models import ChunkItem, Compound, Job, JobState
from db.session import session_scope
from medbatch.services.tokens import Scope, create_token
from medbatch.stack.embedded import EmbeddedStack
from medbatch.stack.process import ManagedProcess, free_port, port_open

UPLOAD_LIMIT = 3 << 20


@dataclass
class Api:
    url: str
    settings: Settings
    tokens: dict[str, str]  # scope → token

    def client(self, scope: str | None = None, **kw: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[scope]}"} if scope else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def api(stack: EmbeddedStack) -> Iterator[Api]:
    s = stack.settings.model_copy(
        update={"api_port": free_port(), "api_max_upload_bytes": UPLOAD_LIMIT}
    )
    argv = [sys.executable, "-m", "medbatch.cli", "serve"]
    proc = ManagedProcess("api", argv, settings_env(s), s.storage_dir / "api-test.log").start()
    try:
        proc.wait_until(lambda: port_open("127.0.0.1", s.api_port), 60, "serving")
        tokens = {
            scope.value: create_token(s, f"test-{scope.value}", frozenset({scope}), actor="t")[1]
            for scope in Scope
        }
        yield Api(f"http://127.0.0.1:{s.api_port}", s, tokens)
    finally:
        proc.stop()


def failed_chunk(settings: Settings, tag: str) -> int:
    """A chunk that failed earlier (as after a long Triton outage), holding one known molecule:
    what an operator retries once Triton is back."""
    with session_scope(settings.database_url) as session:
        compound = session.scalars(select(Compound).limit(1)).one()
        chunk = Job(
            kind=JobKind.CHEM_CHUNK.value,
            source=tag,
            idempotency_key=f"{tag}-chunk",
            params={"model_name": settings.chem_model_name, "model_version": "1"},
        )
        session.add(chunk)
        session.flush()
        session.add(ChunkItem(job_id=chunk.id, position=0, compound_id=compound.id))
        for state in (JobState.QUEUED, JobState.RUNNING):
            transition(session, chunk.id, state, actor="test")
        transition(session, chunk.id, JobState.FAILED, actor="test", error="Triton was down")
        return int(chunk.id)
