"""Serving bench on loopback: the chat service over real releases (Milvus Lite, MLflow registry) on a real uvicorn
server, answered by the in-process Ollama test double (no Ollama server can be installed here), bounded to about
a minute.

    .venv/bin/python bench/serving.py [--questions 20] [--cases 64] [--model-s 0.05]

Measures, through HTTP:
  - chat p50, uncached vs cached (the same questions again: the response cache answers);
  - chat throughput from 32 concurrent clients, with dynamic batching (32 requests or 100 ms) vs one by one
    (batch_max 1 and batch_in_flight 1: the batcher sends a single request at a time);
  - the canary router's cost per question: the session hash alone (serving.canary.route), the whole canary path
    in-process (canary state from the ledger, routing, recording the call), and chat p50 over HTTP with a canary
    running (50% of conversations on a second release) against p50 without one (before and after it).

The double answers after `--model-s` seconds and serves requests concurrently, like an Ollama server with
OLLAMA_NUM_PARALLEL >= 32: the batched/one-by-one ratio here is what the service's batching can give such a
backend, not what a real model's batched decoding gains (that depends on the model server). Last line: name=value.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--cases", type=int, default=64)
    ap.add_argument("--model-s", type=float, default=0.05, help="seconds the double takes per answer")
    args = ap.parse_args()

    import httpx
    from service_world import live_server, served_world

    from erpops.runtime import setup_process
    from serving.app import create_app
    from service_world import SPEC
    from test_ollama import fake_gguf
    from test_vector_store import DOCS

    from deployment.rollout import abort_canary, start_canary
    from erpops.config import CanaryPolicy
    from serving.canary import route
    from serving.providers import Reply
    from serving.service import Service

    setup_process(REPO / ".erpops")
    with served_world(Path(tempfile.mkdtemp(prefix="bench-serving-")), trace=False) as world:
        world.double.generate_delay_s = args.model_s
        one_at_a_time = world.service.settings.model_copy(update={"batch_max": 1, "batch_in_flight": 1})
        one_by_one = Service.from_settings(one_at_a_time, deploy=world.cfg, mlflow=world.mlflow)
        with live_server(world.app) as url, live_server(create_app(one_by_one)) as url_serial, \
                httpx.Client(timeout=120, headers={"X-API-Key": world.keys["operator"]}) as http:
            for base in (url, url_serial):  # loads each service's embedder
                http.post(f"{base}/api/v1/chat", json={"message": "warm-up"})
            questions = [f"How do I transfer stock between warehouses, case {i}?" for i in range(args.questions)]

            def p50(qs: list[str]) -> tuple[float, int]:
                times, cached = [], 0
                for q in qs:
                    t0 = time.perf_counter()
                    body = http.post(f"{url}/api/v1/chat", json={"message": q}).json()
                    times.append(time.perf_counter() - t0)
                    cached += body["cached"]
                return statistics.median(times), cached

            uncached, hits_first = p50(questions)
            cached, hits_second = p50(questions)

            def throughput(base: str) -> float:
                """`--cases` distinct questions from 32 clients at once: answers per second."""
                from concurrent.futures import ThreadPoolExecutor

                asks = [f"Which warehouse posts goods receipt {uuid.uuid4().hex[:6]}?" for _ in range(args.cases)]
                t0 = time.perf_counter()
                with ThreadPoolExecutor(32) as pool:
                    codes = list(pool.map(lambda q: http.post(f"{base}/api/v1/chat", json={"message": q}).status_code, asks))
                assert codes == [200] * len(asks), codes
                return len(asks) / (time.perf_counter() - t0)

            batched, serial = throughput(url), throughput(url_serial)
            batches = list(world.service.batcher.batches)[-8:]

            def fresh_p50(n: int) -> float:
                return p50([f"How do I post a goods issue, {uuid.uuid4().hex[:8]}?" for _ in range(n)])[0]

            before = fresh_p50(args.questions)
            canary = start_canary(world.cfg, world.mlflow, "staging", "2", fake_gguf(world.root, "bench-canary"), SPEC,
                                  DOCS, None, "bench", policy=CanaryPolicy(steps=(50, 100), window_s=3600)).state
            during = fresh_p50(args.questions)
            svc, ref = world.service, world.service.resolve("staging")
            t0 = time.perf_counter()
            for i in range(200):
                _, arm = svc._route(ref, uuid.uuid4().hex)
                svc._record(arm, "How do I post a goods issue?", Reply("Post it in MIGO.", "m", "ollama", 8, 5, 0.05), 0.05)
            path_ms = (time.perf_counter() - t0) / 200 * 1000
            abort_canary(world.cfg, world.mlflow, "staging", "bench", "bench done")
            after = fresh_p50(args.questions)
            assert canary.weight == 50
            overhead_ms = (during - (before + after) / 2) * 1000

        sessions = [uuid.uuid4().hex for _ in range(20_000)]
        t0 = time.perf_counter()
        for s in sessions:
            route(s, 10)
        route_ms = (time.perf_counter() - t0) / len(sessions) * 1000

    print(f"chat over HTTP, {args.questions} questions, model {args.model_s * 1000:.0f} ms (Ollama test double)")
    print(f"{'measure':<40}{'value':>12}")
    print(f"{'chat p50, uncached (s)':<40}{uncached:>12.4f}   cache hits {hits_first}/{args.questions}")
    print(f"{'chat p50, cached (s)':<40}{cached:>12.4f}   cache hits {hits_second}/{args.questions}")
    print(f"{'chat x32 clients, dynamic batching (/s)':<40}{batched:>12.1f}   last batch sizes {batches}")
    print(f"{'chat x32 clients, one by one (/s)':<40}{serial:>12.1f}")
    print(f"{'canary route() per question (ms)':<40}{route_ms:>12.5f}")
    print(f"{'canary path in-process per question (ms)':<40}{path_ms:>12.3f}   ledger read + route + record")
    print(f"{'chat p50, no canary before/after (s)':<40}{before:>12.4f} / {after:.4f}")
    print(f"{'chat p50, canary at 50% (s)':<40}{during:>12.4f}   overhead {overhead_ms:+.1f} ms")
    print(f"uncached_p50_s={uncached:.4f} cached_p50_s={cached:.4f} cache_speedup={uncached / cached:.1f} "
          f"batched_answers_per_s={batched:.1f} serial_answers_per_s={serial:.1f} batch_ratio={batched / serial:.2f} "
          f"canary_route_ms={route_ms:.5f} canary_path_ms={path_ms:.3f} canary_p50_overhead_ms={overhead_ms:.1f} "
          f"backend=double model_s={args.model_s}")


if __name__ == "__main__":
    main()
