"""Conversation context per chat session: the last `max_turns` question/answer pairs, forgotten `ttl_s` seconds
after the last turn. In-process by default; Redis when the service is given a URL, so replicas share it.

Both stores keep the same shape: a list of chat messages ({"role": "user"|"assistant", "content": ...}), oldest
first, at most 2 x max_turns long. Images are not kept (a turn's image is sent with that turn only). The service
keeps a conversation under `conversation_key(key id, session id)`: a session id names a conversation of one API
key only.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Protocol


class ContextStore(Protocol):
    max_turns: int
    ttl_s: int

    def history(self, session: str) -> list[dict]:
        """The session's kept messages, oldest first ([] for an unknown or expired session)."""

    def append(self, session: str, question: str, answer: str) -> None:
        """Add one turn, drop turns beyond max_turns, restart the TTL."""

    def ping(self) -> bool:
        """The store answers (for /readyz)."""


def conversation_key(owner: str, session: str) -> str:
    """The stores' key of a conversation: `<owner>/<session>`, the session id under the id of the API key that
    holds it, so another key naming the same session id reads and writes a conversation of its own."""
    return f"{owner}/{session}"


def _turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class MemoryContext:
    """A dict of sessions in this process, expired lazily; at most `max_sessions` (least recently used go first)."""

    def __init__(self, max_turns: int = 10, ttl_s: int = 1800, max_sessions: int = 10_000, clock=time.monotonic):
        self.max_turns, self.ttl_s, self.max_sessions, self.clock = max_turns, ttl_s, max_sessions, clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[float, list[dict]]] = OrderedDict()

    def history(self, session: str) -> list[dict]:
        with self._lock:
            entry = self._sessions.get(session)
            if entry is None:
                return []
            if entry[0] <= self.clock():
                del self._sessions[session]
                return []
            return [dict(m) for m in entry[1]]

    def append(self, session: str, question: str, answer: str) -> None:
        if self.max_turns == 0:
            return
        with self._lock:
            now = self.clock()
            expires, messages = self._sessions.pop(session, (now + self.ttl_s, []))
            if expires <= now:
                messages = []
            messages = (messages + _turn(question, answer))[-2 * self.max_turns:]
            self._sessions[session] = (now + self.ttl_s, messages)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def ping(self) -> bool:
        return True


class RedisContext:
    """One Redis list per conversation (`erpops:ctx:<key id>/<session>`), trimmed and given a fresh TTL in the same
    transaction."""

    PREFIX = "erpops:ctx:"

    def __init__(self, url: str, max_turns: int = 10, ttl_s: int = 1800):
        import redis

        self.max_turns, self.ttl_s = max_turns, ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)

    def history(self, session: str) -> list[dict]:
        return [json.loads(m) for m in self.client.lrange(self.PREFIX + session, 0, -1)]

    def append(self, session: str, question: str, answer: str) -> None:
        if self.max_turns == 0:
            return
        key = self.PREFIX + session
        with self.client.pipeline(transaction=True) as p:
            p.rpush(key, *(json.dumps(m, ensure_ascii=False) for m in _turn(question, answer)))
            p.ltrim(key, -2 * self.max_turns, -1)
            p.expire(key, self.ttl_s)
            p.execute()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False


def context_store(redis_url: str | None, max_turns: int, ttl_s: int) -> ContextStore:
    return RedisContext(redis_url, max_turns, ttl_s) if redis_url else MemoryContext(max_turns, ttl_s)
