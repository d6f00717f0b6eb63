"""A bounded load test on loopback: two replicas of the service on real uvicorn servers share conversation context
in Redis; 16 concurrent sessions send 8 turns each, alternating between the replicas. Every request must succeed,
each session's context must hold its own last turns in order, and the metrics must count every call. Nothing here
is timed against a goal (bench/ does that)."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import redis_up
from service_world import live_server, served_world

pytestmark = pytest.mark.integration

SESSIONS, TURNS = 16, 8



@pytest.mark.skipif(not redis_up(), reason="no Redis on 127.0.0.1:6379")
def test_two_replicas_under_concurrent_sessions(tmp_path, caplog):
    import httpx

    from serving.app import create_app
    from serving.context import conversation_key
    from serving.keys import split_key
    from serving.service import Service

    redis_url = "redis://127.0.0.1:6379/14"
    with served_world(tmp_path, trace=False, redis_url=redis_url, context_turns=3) as world:
        replica = Service.from_settings(world.service.settings, deploy=world.cfg, mlflow=world.mlflow)
        with live_server(world.app) as url_a, live_server(create_app(replica)) as url_b:
            headers = world.auth("viewer")
            viewer_id = split_key(world.keys["viewer"])[0]
            run = f"load-{uuid.uuid4().hex[:12]}"  # Redis outlives the test: sessions of no earlier run
            failures: list[tuple[str, int, str]] = []

            def session(n: int) -> list[int]:
                statuses = []
                with httpx.Client(timeout=60, headers=headers) as http:
                    for turn in range(TURNS):
                        url = (url_a, url_b)[(n + turn) % 2]
                        r = http.post(f"{url}/api/v1/chat", json={"message": f"stock transfer {n}-{turn}?",
                                                                  "session_id": f"{run}-{n}"})
                        statuses.append(r.status_code)
                        if r.status_code != 200:
                            failures.append((url, r.status_code, r.text[:500]))
                return statuses

            try:
                with ThreadPoolExecutor(8) as pool:
                    statuses = [s for out in pool.map(session, range(SESSIONS)) for s in out]
                errors = [r.getMessage() + "\n" + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
                          for r in caplog.records if r.levelno >= logging.ERROR]  # the service log of a 500
                assert statuses == [200] * SESSIONS * TURNS, (failures, errors)
                for n in range(SESSIONS):
                    kept = world.service.context.history(conversation_key(viewer_id, f"{run}-{n}"))
                    assert [m["content"] for m in kept if m["role"] == "user"] == [
                        f"stock transfer {n}-{t}?" for t in range(TURNS - 3, TURNS)]
                served = sum(s.live.summary("staging")["requests"] for s in (world.service, replica))
                assert served == SESSIONS * TURNS
                assert all(s.live.summary("staging")["errors"] == 0 for s in (world.service, replica))
            finally:
                store = world.service.context
                store.client.delete(*[store.PREFIX + conversation_key(viewer_id, f"{run}-{n}") for n in range(SESSIONS)])
