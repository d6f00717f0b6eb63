"""The calls a canary's analysis judges: each answered question of a running canary, per arm (canary or stable),
with its time, outcome, latency and what was wrong with the answer. In-process by default (each replica judges its
own traffic); in Redis when the service has `redis_url`, so every replica's calls are judged together.

    log = call_log(None)          # or call_log("redis://127.0.0.1:6379/0")
    log.record("canary-v3-...", "canary", Call(True, 0.41))
    log.calls("canary-v3-...", "canary", since=t0)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Protocol

from serving.canary import Call

KEEP = 100_000
"""Most calls kept per canary and arm (the oldest go first)."""


class CallLog(Protocol):
    def record(self, canary_id: str, arm: str, call: Call, at: float | None = None) -> None: ...

    def calls(self, canary_id: str, arm: str, since: float) -> list[Call]: ...


class MemoryCallLog:
    def __init__(self, keep: int = KEEP):
        self._calls: dict[tuple[str, str], deque] = defaultdict(lambda: deque(maxlen=keep))
        self._lock = threading.Lock()

    def record(self, canary_id: str, arm: str, call: Call, at: float | None = None) -> None:
        with self._lock:
            self._calls[(canary_id, arm)].append((time.time() if at is None else at, call))

    def calls(self, canary_id: str, arm: str, since: float) -> list[Call]:
        with self._lock:
            return [c for t, c in self._calls.get((canary_id, arm), ()) if t >= since]


class RedisCallLog:
    """A sorted set per canary and arm, scored by time; kept a day after its last call."""

    def __init__(self, url: str, keep: int = KEEP, ttl_s: int = 86_400):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=5)
        self.keep, self.ttl_s = keep, ttl_s

    @staticmethod
    def _key(canary_id: str, arm: str) -> str:
        return f"erpops:canary:{canary_id}:{arm}"

    def record(self, canary_id: str, arm: str, call: Call, at: float | None = None) -> None:
        key = self._key(canary_id, arm)
        member = json.dumps({"id": uuid.uuid4().hex[:12], "ok": call.ok, "latency_s": call.latency_s,
                             "problems": list(call.problems)})
        pipe = self.r.pipeline()
        pipe.zadd(key, {member: time.time() if at is None else at})
        pipe.zremrangebyrank(key, 0, -self.keep - 1)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def calls(self, canary_id: str, arm: str, since: float) -> list[Call]:
        out = []
        for raw in self.r.zrangebyscore(self._key(canary_id, arm), since, "+inf"):
            d = json.loads(raw)
            out.append(Call(d["ok"], d["latency_s"], tuple(d["problems"])))
        return out


def call_log(redis_url: str | None) -> CallLog:
    return RedisCallLog(redis_url) if redis_url else MemoryCallLog()
