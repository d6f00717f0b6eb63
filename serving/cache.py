"""Response cache of the chat service: a non-streamed answer is reused when the same release gets the same
question with the same conversation, parameters and retrieved context, for `ttl_s` seconds (seeds: 10k entries,
3600 s). In-process (an LRU) by default; Redis when the service has a Redis URL, so replicas share it.

The key starts with the release id, and `invalidate(release)` drops that release's entries at once. The key names
the release the ledger said served when the question came; the service stores an answer under it only when that
release served for the whole of the answer (no switch under way or written meanwhile: `Service.chat`), so a release
switch (or rollback) never serves an answer of another release.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Protocol


def cache_key(release: str, messages: list[dict], parameters: dict) -> str:
    """`<release>:<sha256>` over the exact messages sent (system prompt with the retrieved chunks, the kept
    conversation, the question) and the generation parameters; images make a request uncacheable (None)."""
    body = json.dumps({"messages": messages, "parameters": parameters}, sort_keys=True, ensure_ascii=False)
    return f"{release}:{hashlib.sha256(body.encode()).hexdigest()}"


class ResponseCache(Protocol):
    hits: int
    misses: int

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...

    def invalidate(self, release: str) -> int:
        """Drop every entry of a release; returns how many."""


class MemoryCache:
    """LRU of at most `max_entries`, each valid `ttl_s` seconds after it was stored."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0, clock=time.monotonic):
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] <= self.clock():
                if entry is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return dict(entry[1])

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._entries[key] = (self.clock() + self.ttl_s, dict(value))
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, release: str) -> int:
        with self._lock:
            gone = [k for k in self._entries if k.startswith(f"{release}:")]
            for k in gone:
                del self._entries[k]
            return len(gone)

    def __len__(self) -> int:
        return len(self._entries)


class RedisCache:
    """One Redis string per entry (`erpops:cache:<release>:<sha256>`, EX ttl_s), and per release a sorted set of
    its keys by last use, trimmed to `max_entries` (the least recently used go first)."""

    PREFIX = "erpops:cache:"

    def __init__(self, url: str, max_entries: int = 10_000, ttl_s: int = 3600):
        import redis

        self.max_entries, self.ttl_s = max_entries, int(ttl_s)
        self.hits = self.misses = 0
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)

    def _index(self, key: str) -> str:
        return f"{self.PREFIX}index:{key.split(':', 1)[0]}"

    def get(self, key: str) -> dict | None:
        raw = self.client.get(self.PREFIX + key)
        if raw is None:
            self.misses += 1
            return None
        self.client.zadd(self._index(key), {key: time.time()})
        self.hits += 1
        return json.loads(raw)

    def put(self, key: str, value: dict) -> None:
        index = self._index(key)
        with self.client.pipeline(transaction=True) as p:
            p.set(self.PREFIX + key, json.dumps(value, ensure_ascii=False), ex=self.ttl_s)
            p.zadd(index, {key: time.time()})
            p.expire(index, self.ttl_s)
            p.execute()
        over = self.client.zcard(index) - self.max_entries
        if over > 0:
            oldest = self.client.zrange(index, 0, over - 1)
            with self.client.pipeline(transaction=True) as p:
                p.delete(*(self.PREFIX + k for k in oldest))
                p.zrem(index, *oldest)
                p.execute()

    def invalidate(self, release: str) -> int:
        index = f"{self.PREFIX}index:{release}"
        keys = self.client.zrange(index, 0, -1)
        with self.client.pipeline(transaction=True) as p:
            if keys:
                p.delete(*(self.PREFIX + k for k in keys))
            p.delete(index)
            p.execute()
        return len(keys)


def response_cache(redis_url: str | None, max_entries: int, ttl_s: float) -> ResponseCache:
    return RedisCache(redis_url, max_entries, int(ttl_s)) if redis_url else MemoryCache(max_entries, ttl_s)
