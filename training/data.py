"""Chat-template formatting with labels on assistant tokens only.

The conversation is rendered once with the tokenizer's own chat template; the character spans of the
assistant turns are found by rendering growing prefixes (with and without the generation prompt), and
a token is a label exactly when its characters fall inside such a span. The assistant header
(`<|im_start|>assistant\\n`) is context, the content and the end-of-turn token are targets.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def with_targets(encoded: list[Encoded]) -> list[Encoded]:
    """The examples with at least one assistant token to learn from (the training loop's, in order)."""
    return [e for e in encoded if any(t != IGNORE_INDEX for t in e.labels)]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(prefix):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        # the trailing newline after the end-of-turn token is formatting, not a target
        while end > start and text[end - 1] in "\n ":
            end -= 1
        spans.append((start, end))
    return text, spans


def encode_example(tokenizer, messages: list[dict]) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s >= a and e <= b and e > s for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return Encoded(list(enc["input_ids"]), labels)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """Everything before the last assistant turn, with the generation prompt: what the model answers."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: the eos token and the template's end-of-turn token
    (`<end_of_turn>` for Gemma, whose eos is `<eos>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def pad_batch(batch: list[Encoded], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (pad positions ignored)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit decreasing: indices of examples grouped into rows of at most max_len tokens.
    An example longer than max_len gets a row of its own (the data contract keeps them out)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def pack_batch(batch: list[Encoded], pad_id: int, max_len: int):
    """Padding-free batch: examples concatenated into rows of up to max_len tokens, position_ids
    restarting at each example. With no attention_mask, transformers builds a block-diagonal mask
    from the position_ids, so examples in a row never see each other. The few pad tokens left at row
    ends get position 0 (each its own one-token sequence) and no label."""
    import torch

    rows = pack_rows([len(e.input_ids) for e in batch], max_len)
    width = max(sum(len(batch[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(batch[i].input_ids)
            ids[r, at:at + n] = torch.tensor(batch[i].input_ids)
            lab = torch.tensor(batch[i].labels)
            lab[0] = IGNORE_INDEX  # the first token of an example is never predicted from the previous one
            labels[r, at:at + n] = lab
            pos[r, at:at + n] = torch.arange(n)
            at += n
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def to_device(batch: dict, device) -> dict:
    """A collated batch's tensors on `device` (the `doc_lengths` tuple of `pack_flat` as it is)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def pack_flat(batch: list[Encoded]):
    """The whole batch as one row with no padding at all: examples back to back, position_ids restarting at
    each, and `doc_lengths` (their lengths, in order) for `training.packed_attention`, which attends within
    each example only. Labels as in `pack_batch`."""
    import torch

    ids = torch.tensor([t for e in batch for t in e.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([IGNORE_INDEX if i == 0 else t for e in batch for i, t in enumerate(e.labels)],
                          dtype=torch.long)[None]
    pos = torch.cat([torch.arange(len(e.input_ids)) for e in batch])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": labels,
            "doc_lengths": tuple(len(e.input_ids) for e in batch)}
