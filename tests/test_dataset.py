import random

from data_contracts.dataset import build_dataset, content_digest, in_eval


def rows(n):
    return [{"id": f"r{i}", "module": "hr", "lang": "en", "instruction": f"q{i}", "response": f"a{i}"} for i in range(n)]


def test_split_is_deterministic_and_order_independent():
    data = rows(200)
    a = build_dataset(data, [], seed=1, eval_fraction=0.2)
    shuffled = data[:]
    random.Random(0).shuffle(shuffled)
    b = build_dataset(shuffled, [], seed=1, eval_fraction=0.2)
    assert [e["id"] for e in a.eval] == [e["id"] for e in b.eval]
    assert a.digest == b.digest
    assert 20 <= len(a.eval) <= 60  # ~20% of 200
    assert not {e["id"] for e in a.train} & {e["id"] for e in a.eval}


def test_seed_changes_split_not_digest():
    a = build_dataset(rows(200), [], seed=1, eval_fraction=0.2)
    b = build_dataset(rows(200), [], seed=2, eval_fraction=0.2)
    assert {e["id"] for e in a.eval} != {e["id"] for e in b.eval}
    assert a.digest == b.digest


def test_adding_rows_never_moves_existing_examples():
    small = build_dataset(rows(100), [], seed=3, eval_fraction=0.2)
    big = build_dataset(rows(150), [], seed=3, eval_fraction=0.2)
    assert {e["id"] for e in small.eval} <= {e["id"] for e in big.eval}


def test_digest_changes_with_content():
    data = rows(10)
    changed = [dict(r) for r in data]
    changed[3]["response"] = "different"
    assert build_dataset(data, [], 1, 0.2).digest != build_dataset(changed, [], 1, 0.2).digest
    assert content_digest([]) == content_digest([])


def test_chat_logs_become_multiturn_examples():
    chat = {"id": "c1", "module": "hr", "lang": "ko", "messages": [
        {"role": "user", "content": "연차 신청은?"}, {"role": "assistant", "content": "인사 > 근태 메뉴입니다."},
        {"role": "user", "content": "승인자는?"}, {"role": "assistant", "content": "팀장입니다."}]}
    ds = build_dataset([], [chat], 1, 0.0001)
    (ex,) = ds.train + ds.eval
    assert ex["source"] == "chat_logs" and len(ex["messages"]) == 4


def test_in_eval_fraction_is_respected_roughly():
    share = sum(in_eval(f"id-{i}", 42, 0.15) for i in range(5000)) / 5000
    assert 0.13 < share < 0.17
