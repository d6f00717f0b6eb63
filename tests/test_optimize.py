import copy
from pathlib import Path

import pytest
import torch

from erpops.config import OptimizeConfig
from erpops.device import Runtime
from training.optimize import magnitude_prune, overall_sparsity, pick_int8_backend, prunable_linears


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_magnitude_pruning_hits_the_amount_in_every_decoder_linear_only(tiny):
    emb_before = tiny.get_input_embeddings().weight.clone()
    per_layer = magnitude_prune(tiny, 0.3)
    names = [n for n, _ in prunable_linears(tiny)]
    assert set(per_layer) == set(names) and len(names) == 2 * 7  # q,k,v,o,gate,up,down per layer
    assert all(abs(s - 0.3) < 0.01 for s in per_layer.values())
    assert abs(overall_sparsity(tiny) - 0.3) < 0.01
    assert torch.equal(tiny.get_input_embeddings().weight, emb_before)  # embeddings / tied lm_head stay dense
    # permanent: no pruning re-parametrisation left behind
    assert not any(n.endswith("weight_orig") for n, _ in tiny.named_parameters())


def test_pruning_removes_the_smallest_weights(tiny):
    name, layer = prunable_linears(tiny)[0]
    before = layer.weight.detach().abs().clone()
    magnitude_prune(tiny, 0.3)
    zeroed = layer.weight == 0
    assert before[zeroed].max() <= before[~zeroed].min()


def test_int8_backend_choice_is_resolved_once():
    assert pick_int8_backend(OptimizeConfig(), Runtime("cpu", "float32")) == "torchao"
    assert pick_int8_backend(OptimizeConfig(), Runtime("cuda", "bfloat16")) == "bitsandbytes"
    assert pick_int8_backend(OptimizeConfig(int8_backend="quanto"), Runtime("cuda", "bfloat16")) == "quanto"


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_cpu_int8_backends_keep_outputs_close_and_shrink(tiny, backend, tmp_path):
    from training.optimize import quantize_int8, saved_size_mb

    ids = torch.tensor([[1, 20, 300, 4000, 50]])
    with torch.no_grad():
        ref = tiny(input_ids=ids).logits
        q = quantize_int8(tiny, backend, tmp_path)
        out = q(input_ids=ids).logits
    assert torch.allclose(ref, tiny(input_ids=ids).logits)  # the input model is untouched
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    assert saved_size_mb(q) < saved_size_mb(tiny)


@pytest.mark.parametrize("backend", [None, "torchao"])
def test_saved_size_counts_what_torch_save_writes(tiny, backend, tmp_path):
    from training.optimize import quantize_int8, saved_size_mb

    model = tiny if backend is None else quantize_int8(tiny, backend, tmp_path)
    # a file's name is in every record of its archive: "archive" is the name torch.save gives a stream's
    torch.save(model.state_dict(), tmp_path / "archive.pt")
    assert saved_size_mb(model) == (tmp_path / "archive.pt").stat().st_size / 1e6


@pytest.mark.gpu
def test_bitsandbytes_int8_on_gpu(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.optimize import quantize_int8

    q = quantize_int8(None, "bitsandbytes", tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    ids = torch.tensor([[1, 20, 300]]).cuda()
    with torch.no_grad():
        sim = torch.nn.functional.cosine_similarity(ref(input_ids=ids).logits.flatten().float(),
                                                    q(input_ids=ids).logits.flatten().float(), dim=0)
    assert sim > 0.98


def test_gguf_export_reads_back_and_agrees(tiny, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from erpops.summary import PhaseClock
    from evaluation.scoring import response_nll
    from training.gguf import export_and_verify
    from training.optimize import choose_gguf

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [{"id": "ko", "messages": [{"role": "user", "content": "재고 이동은 어떻게 하나요?"},
                                          {"role": "assistant", "content": "재고 이동 화면에서 창고를 고르고 수량을 입력합니다."}]},
                {"id": "en", "messages": [{"role": "user", "content": "How do I post a journal entry?"},
                                          {"role": "assistant", "content": "Open General Ledger, enter the lines and post."}]}]
    runtime = Runtime("cpu", "float32")
    reference = response_nll(tiny, tok, examples, runtime, top_tokens=True)
    clock = PhaseClock()
    g = export_and_verify(tiny_model_dir, tok, tmp_path, ["f16"], examples, reference, {"f16": 0.95}, runtime, clock)["f16"]
    assert g.path.is_file() and g.tokenizer_match and g.agreement >= 0.95 and len(g.sha256) == 64
    assert abs(g.perplexity / reference.perplexity - 1) < 0.01  # f16 of an fp32 model: the same scores
    assert {"gguf_convert_f16", "gguf_load_f16", "gguf_score_f16"} <= set(clock)
    # the per-example scores the gate reuses are what the evaluate stage computes from the file itself
    from evaluation.evaluate import known_nll
    from training.gguf import load_gguf_model

    model, gguf_tok = load_gguf_model(g.path)
    fresh, reused = response_nll(model, gguf_tok, examples, runtime), known_nll(g.example_nll, examples)
    assert reused.tokens == fresh.tokens and reused.perplexity == pytest.approx(g.perplexity)
    assert reused.nll == pytest.approx(fresh.nll, rel=1e-5)
    assert known_nll(g.example_nll, examples + [{"id": "unscored", "messages": []}]) is None  # all or nothing
    strict = export_and_verify(tiny_model_dir, tok, tmp_path / "strict", ["f16"], examples, reference, {"f16": 1.01})["f16"]
    assert not strict.passed and "agreement" in strict.problem
    kind, why = choose_gguf("f16", {"f16": strict}, reference.perplexity, 1.02)
    assert kind is None and "no GGUF export can ship" in why and "f16 failed verification" in why
    # the agreement counts real disagreements: against another model's choices it drops
    other = reference.__class__(reference.nll, reference.tokens, [t + 1 for t in reference.top])
    disagree = export_and_verify(tiny_model_dir, tok, tmp_path / "other", ["f16"], examples, other, {"f16": 0.5})["f16"]
    assert disagree.agreement == 0.0 and not disagree.passed


def test_logged_adapter_and_merged_model_load_back_with_identical_logits(tiny_model_dir, corpus, tmp_path, mlflow_settings):
    """Train, optimize with tracking, then rebuild the shipped model from the logged adapter + base and
    compare with the logged merged model, bit for bit."""
    import mlflow
    from transformers import AutoModelForCausalLM

    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import Recipe
    from erpops.tracking import Tracker
    from training.lora import train_lora
    from training.optimize import merge_lora, optimize_model

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"},
                                    "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32"},
                                    "optimize": {"prune_method": "magnitude", "int8_backend": "torchao", "verify_prompts": 2,
                                                 "speed_prompts": 1, "min_agreement": {"f16": 0.9, "q8_0": 0.5}}})
    runtime = Runtime("cpu", "float32")
    tracker = Tracker.start(mlflow_settings, "opt")
    trained = train_lora(recipe, tiny_model_dir, read_examples(data.train_path), tmp_path, runtime, tracker)
    optimize_model(recipe.optimize, tiny_model_dir, trained.adapter_dir, read_examples(data.eval_path)[:4], tmp_path,
                   runtime, tracker)
    tracker.end()
    mlflow.set_tracking_uri(mlflow_settings.tracking_uri)
    adapter = mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="adapter", dst_path=str(tmp_path / "dl"))
    merged = mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="merged_model", dst_path=str(tmp_path / "dl"))
    rebuilt = merge_lora(tiny_model_dir, Path(adapter))
    magnitude_prune(rebuilt, recipe.optimize.prune_amount)
    logged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = torch.tensor([[1, 20, 300, 4000, 50, 7]])
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, logged(input_ids=ids).logits)
    # the per-variant table, as metrics and as an artifact
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    for v in ("merged_fp32", "int8_torchao"):
        assert {f"optimize/{v}/{k}" for k in ("perplexity", "ppl_ratio", "size_mb", "tokens_per_s", "memory_mb")} <= set(metrics)
    assert {"optimize/gguf_q8_0/agreement", "optimize/gguf_q8_0/ppl_ratio", "optimize/seconds/gguf_score_q8_0"} <= set(metrics)
    assert "variants.txt" in [a.path.split("/")[-1] for a in tracker.client.list_artifacts(tracker.run_id, "optimize")]


def test_pruning_decision_is_a_pure_threshold():
    from training.optimize import decide_pruning

    assert decide_pruning(10.0, 10.9, 1.10).keep
    d = decide_pruning(10.0, 11.2, 1.10)
    assert not d.keep and abs(d.ratio - 1.12) < 1e-9 and "falling back" in d.reason
    assert not decide_pruning(10.0, float("nan"), 1.10).keep
    assert not decide_pruning(0.0, 5.0, 1.10).keep


def test_failed_pruning_and_quantization_fall_back(tiny_model_dir, corpus, tmp_path):
    """Thresholds no variant can meet: the unpruned model, no int8 model and the f16 GGUF ship; lenient
    thresholds: the pruned model, the saved int8 model and the Q8_0 GGUF."""
    import json

    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import Recipe
    from training.lora import train_lora
    from training.optimize import load_int8, optimize_model

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    runtime = Runtime("cpu", "float32")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"}, "train": {"max_steps": 2, "precision": "fp32"}})
    train = read_examples(data.train_path)
    trained = train_lora(recipe, tiny_model_dir, train, tmp_path, runtime)
    evals = read_examples(data.eval_path)[:4]
    strict = OptimizeConfig(prune_method="wanda", calibration_examples=4, int8_backend="torchao", gguf_types=["q8_0"],
                            ship="q8_0", verify_prompts=2, min_agreement={"f16": 0.95, "q8_0": 0.5}, speed_prompts=1,
                            max_prune_ppl_ratio=0.5, max_quant_ppl_ratio=0.5)  # nothing can pass: every fallback runs
    result = optimize_model(strict, tiny_model_dir, trained.adapter_dir, evals, tmp_path / "strict", runtime,
                            calibration_examples=train)
    assert result.pruning is not None and not result.pruning.keep
    assert not result.int8.keep and result.int8_dir is None and "falling back" in result.int8.reason
    assert result.shipped == "f16" and "f16 GGUF ships instead" in result.ship_reason
    assert "model-f16.gguf" in result.modelfile.read_text() and "model-q8_0" not in result.modelfile.read_text()
    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert overall_sparsity(shipped) < 0.01  # the unpruned weights shipped
    saved = json.loads((tmp_path / "strict" / "optimize.json").read_text())
    assert saved["pruning"]["keep"] is False and saved["shipped"] == "f16"
    parts = [saved["seconds"][f"prune_{p}"] for p in ("capture", "forward", "solve")]
    assert all(p > 0 for p in parts) and sum(parts) <= saved["seconds"]["prune"] + 1e-5  # the prune's profile
    names = [v["name"] for v in saved["variants"]]
    assert names == ["merged_fp32", "pruned_wanda_30pct", "int8_torchao", "gguf_q8_0", "gguf_f16"]  # f16: the fallback
    assert all(v["perplexity"] > 0 for v in saved["variants"])
    assert saved["variants"][0]["tokens_per_s"] > 0 and saved["variants"][2]["memory_mb"] < saved["variants"][0]["memory_mb"]
    assert saved["variants"][1]["tokens_per_s"] is None  # the pruned model runs as fast as the merged one: not timed

    lenient = strict.model_copy(update={"max_prune_ppl_ratio": 100.0, "max_quant_ppl_ratio": 100.0})
    result = optimize_model(lenient, tiny_model_dir, trained.adapter_dir, evals, tmp_path / "lenient", runtime,
                            calibration_examples=train)
    assert result.pruning.keep and result.int8.keep and result.shipped == "q8_0"
    assert not (tmp_path / "lenient" / "gguf" / "model-f16.gguf").exists()  # no fallback needed, none exported
    assert abs(overall_sparsity(AutoModelForCausalLM.from_pretrained(result.merged_dir)) - 0.3) < 0.02
    assert load_int8(result.int8_dir) is not None


def test_conversion_runs_in_process_and_leaves_the_process_as_it_was(tiny_model_dir, tmp_path, capfd):
    """llama.cpp's converter runs its command line here: on success and on failure, argv, the root logger and the
    converter's loggers are as before, nothing reaches this process's output, and a failure names its cause and
    leaves no file."""
    import logging
    import shutil
    import sys

    from gguf import GGUFReader

    from training.gguf import CONVERTER_LOGGERS, convert

    root = logging.getLogger()

    def state():
        return (list(sys.argv), list(root.handlers), root.level,
                [(logging.getLogger(n).level, logging.getLogger(n).propagate, list(logging.getLogger(n).handlers))
                 for n in CONVERTER_LOGGERS])

    before = state()
    path = convert(tiny_model_dir, tmp_path / "model-q8_0.gguf", "q8_0")
    assert state() == before
    assert {t.name for t in GGUFReader(path).tensors} >= {"token_embd.weight", "blk.0.attn_q.weight"}
    assert not list(tmp_path.glob("*.partial"))
    out, err = capfd.readouterr()
    assert "Writing" not in out + err and "hf-to-gguf" not in out + err

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = (broken / "config.json").read_text().replace('"LlamaForCausalLM"', '"NoSuchModelForCausalLM"')
    (broken / "config.json").write_text(config)
    with pytest.raises(RuntimeError, match=r"(?s)GGUF conversion to f16 failed \(exit 1\).*NoSuchModelForCausalLM"):
        convert(broken, tmp_path / "broken-f16.gguf", "f16")
    assert state() == before
    assert not (tmp_path / "broken-f16.gguf").exists() and not list(tmp_path.glob("*.partial"))


def test_choose_gguf_is_a_pure_decision():
    from pathlib import Path

    from training.gguf import GGUFExport
    from training.optimize import choose_gguf

    def g(kind, ppl, passed=True):
        return GGUFExport(kind, Path(f"model-{kind}.gguf"), 1.0, "x", 0.99, True, ppl, passed, "" if passed else "agreement 0.5")

    # q8_0 is judged against the HF model it was converted from (perplexity 10.0 here)
    assert choose_gguf("q8_0", {"q8_0": g("q8_0", 10.05)}, 10.0, 1.01)[0] == "q8_0"
    assert choose_gguf("q8_0", {"f16": g("f16", 10.0), "q8_0": g("q8_0", 10.05)}, 10.0, 1.01)[0] == "q8_0"
    kind, why = choose_gguf("q8_0", {"f16": g("f16", 10.0), "q8_0": g("q8_0", 10.5)}, 10.0, 1.01)
    assert kind == "f16" and "1.0500x" in why
    kind, why = choose_gguf("q8_0", {"f16": g("f16", 10.0), "q8_0": g("q8_0", 10.0, passed=False)}, 10.0, 1.01)
    assert kind == "f16" and "failed verification" in why
    # no f16 exported yet: nothing can ship, and the caller is told why (it then exports f16)
    kind, why = choose_gguf("q8_0", {"q8_0": g("q8_0", 10.5)}, 10.0, 1.01)
    assert kind is None and "1.0500x" in why
    assert choose_gguf("q8_0", {"q8_0": g("q8_0", float("nan"))}, 10.0, 1.01)[0] is None
    kind, why = choose_gguf("q8_0", {"f16": g("f16", 10.0, False), "q8_0": g("q8_0", 10.0, False)}, 10.0, 1.01)
    assert kind is None and "f16 failed verification" in why
    assert choose_gguf("f16", {"f16": g("f16", 12.0)}, 10.0, 1.01)[0] == "f16"  # f16: verification alone


def test_wanda_prunes_each_row_by_weight_times_activation(tiny, tiny_model_dir):
    """Every row loses exactly the share asked for, and which weights go depends on the activations:
    magnitude alone would pick other ones."""
    from transformers import AutoTokenizer

    from training.optimize import calibration_inputs, prunable_linears, wanda_prune

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    convo = lambda q: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "전표입력 메뉴입니다."}]}
    calib = calibration_inputs(tok, [convo("전표 입력은 어디서 하나요?"), convo("How do I post a goods receipt?")], 64)
    by_wanda, by_magnitude = copy.deepcopy(tiny), copy.deepcopy(tiny)
    sparsity = wanda_prune(by_wanda, 0.3, calib)
    magnitude_prune(by_magnitude, 0.3)
    assert set(sparsity) == {n for n, _ in prunable_linears(tiny)}
    differs = 0
    for (name, w), (_, m) in zip(prunable_linears(by_wanda), prunable_linears(by_magnitude)):
        zeros_per_row = (w.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == int(w.in_features * 0.3)), name
        differs += int(((w.weight == 0) != (m.weight == 0)).sum())
    assert differs > 0


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_int8_models_save_and_load_back_with_the_same_outputs(tiny, tiny_model_dir, tmp_path, backend):
    from transformers import AutoTokenizer

    from training.optimize import load_int8, quantize_int8, save_int8

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    q = quantize_int8(tiny, backend, tiny_model_dir)
    folder = save_int8(q, backend, tok, tmp_path / backend)
    back = load_int8(folder)
    ids = tok("재고 이동 전표를 어떻게 입력하나요?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, back(input_ids=ids).logits)
    assert type(back.model.layers[0].self_attn.q_proj) is type(q.model.layers[0].self_attn.q_proj)


@pytest.mark.slow
def test_llama_cpp_generates_what_transformers_generates_from_the_gguf(tiny_model_dir, tmp_path):
    """The exported GGUF in llama.cpp itself (the engine Ollama runs): its tokenizer gives the same ids,
    and its greedy continuation of held-out prompts matches transformers reading the same file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (make llamacpp)")
    from itertools import islice

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.gguf import convert

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = convert(tiny_model_dir, tmp_path / "model-f16.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    prompts = ["<|im_start|>user\n재고 이동은 어떻게 하나요?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nHow do I post a journal entry?<|im_end|>\n<|im_start|>assistant\n"]
    agree = total = 0
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids
        ours = back.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        theirs = list(islice(llm.generate(ids, temp=0.0, top_k=1, reset=True), len(ours)))
        agree += sum(a == b for a, b in zip(theirs, ours))
        total += len(ours)
    assert agree / total >= 0.9  # f16 vs fp32 arithmetic: a near-tie in a random model may flip


def test_sparsegpt_hits_the_sparsity_and_reconstructs_better_than_magnitude(tiny, tiny_model_dir):
    """Same 30% of weights removed, but SparseGPT updates the kept ones: on the calibration text the
    pruned model's logits stay closer to the dense model's than after magnitude pruning."""
    from transformers import AutoTokenizer

    from training.optimize import calibration_inputs, sparsegpt_prune

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    convo = lambda q: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "재고 이동 메뉴입니다."}]}
    calib = calibration_inputs(tok, [convo(f"{i}번 창고에서 재고를 옮기려면?") for i in range(6)] +
                               [convo(f"How do I move stock from warehouse {i}?") for i in range(6)], 64)
    by_sparsegpt, by_magnitude = copy.deepcopy(tiny), copy.deepcopy(tiny)
    sparsity = sparsegpt_prune(by_sparsegpt, 0.3, calib)
    magnitude_prune(by_magnitude, 0.3)
    assert all(abs(s - 0.3) < 0.01 for s in sparsity.values())
    with torch.no_grad():
        dense = [tiny(input_ids=ids).logits for ids in calib]
        err = {name: sum(float((m(input_ids=ids).logits - d).pow(2).mean()) for ids, d in zip(calib, dense))
               for name, m in (("sparsegpt", by_sparsegpt), ("magnitude", by_magnitude))}
    assert err["sparsegpt"] < err["magnitude"], err


def _sparsegpt_loop(W, Hinv, amount: float, block: int):
    """SparseGPT as the paper's reference code writes it: the OBS update column by column."""
    import torch

    W = W.clone()
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        score = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
        mask = torch.zeros_like(W1, dtype=torch.bool)
        mask.view(-1)[torch.topk(score.flatten(), int(score.numel() * amount), largest=False).indices] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


@pytest.mark.parametrize("rows,cols,block", [(48, 40, 16), (300, 96, 32), (20, 70, 128)])
def test_sparsegpt_weights_match_the_reference_loop(rows, cols, block):
    import torch

    from training.optimize import _damped_inverse, sparsegpt_weights

    g = torch.Generator().manual_seed(rows)
    X = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X[:, 3] = 0  # a dead input feature
    H = X.T @ X
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    Hinv, dead = _damped_inverse(H, 0.01)
    W[:, dead] = 0
    expected = _sparsegpt_loop(W, Hinv, 0.3, block)
    got = sparsegpt_weights(W.clone(), Hinv, dead, 0.3, block)
    assert torch.equal(got == 0, expected == 0)  # the same weights pruned
    assert abs(float((got == 0).double().mean()) - 0.3) < 0.01
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), float((got - expected).abs().max())


@pytest.mark.gpu
def test_sparsegpt_weights_on_the_gpu_match_the_cpu():
    """Every tensor of the solve on the weights' device (a mask built on the CPU failed on CUDA indices)."""
    import torch

    from training.optimize import _damped_inverse, sparsegpt_weights

    g = torch.Generator().manual_seed(7)
    X = torch.randn(256, 64, generator=g, dtype=torch.float64)
    W = torch.randn(48, 64, generator=g, dtype=torch.float64)
    Hinv, dead = _damped_inverse(X.T @ X, 0.01)
    cpu = sparsegpt_weights(W.clone(), Hinv, dead, 0.3, 32)
    gpu = sparsegpt_weights(W.cuda(), Hinv.cuda(), dead.cuda(), 0.3, 32).cpu()
    assert torch.equal(gpu == 0, cpu == 0) and torch.allclose(gpu, cpu, rtol=1e-9, atol=1e-9)


def test_calibrated_prune_shares_one_statistic_between_linears_of_one_input(tiny, tiny_model_dir):
    """q, k and v read the same normed hidden states: one H for the three (not three equal ones)."""
    from transformers import AutoTokenizer

    from training.optimize import _calibrated_prune, calibration_inputs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    calib = calibration_inputs(tok, [{"messages": [{"role": "user", "content": "재고 이동 절차는?"},
                                                   {"role": "assistant", "content": "Use MIGO with movement 311."}]}] * 2, 64)
    seen: dict[str, object] = {}

    def record(linears, H):
        seen.update({names[id(m)]: H for m in linears})

    model = copy.deepcopy(tiny)
    names = {id(m): n for n, m in model.named_modules()}
    _calibrated_prune(model, calib, "hessian", record)
    layer = "model.layers.0."
    assert seen[layer + "self_attn.q_proj"] is seen[layer + "self_attn.k_proj"] is seen[layer + "self_attn.v_proj"]
    assert seen[layer + "mlp.gate_proj"] is seen[layer + "mlp.up_proj"]
    assert seen[layer + "self_attn.o_proj"] is not seen[layer + "self_attn.q_proj"]
    assert seen[layer + "mlp.down_proj"] is not seen[layer + "mlp.gate_proj"]


def test_calibration_runs_each_block_once(tiny, monkeypatch):
    """Block by block, each pruned inside its one forward over all calibration tokens (block 0 runs once more,
    with hooks that only look, to find which Linears read one input). Capturing the first block's inputs runs
    no block at all, and leaves every block's own forward in place."""
    from collections import Counter

    from training.optimize import sparsegpt_prune

    layers = list(tiny.model.layers)
    cls = type(layers[0])
    forward, runs = cls.forward, Counter()

    def counted(self, *args, **kwargs):
        runs[layers.index(self)] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    calibration = [torch.randint(0, 250, (1, n)) for n in (12, 20, 7)]
    sparsegpt_prune(tiny, 0.3, calibration)
    assert runs == {0: 2, **{i: 1 for i in range(1, len(layers))}}
    assert all("forward" not in vars(layer) for layer in layers)


def test_each_linear_is_pruned_from_what_the_pruned_linears_before_it_produce(tiny):
    """True sequential: a Linear's statistic is taken from the input its block's Linears before it produced
    after they were pruned. Pruning q, k and v (then gate and up) to all zeros makes o_proj's input (then
    down_proj's) all zeros; a statistic from the unpruned block's forward would not be."""
    from training.optimize import _calibrated_prune

    model = copy.deepcopy(tiny)
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, torch.Tensor] = {}

    def zero(linears, H):
        for m in linears:
            seen[names[id(m)]] = H
            m.weight.data.zero_()

    calibration = [torch.randint(1, 250, (1, n), generator=torch.Generator().manual_seed(n)) for n in (12, 20, 7)]
    _calibrated_prune(model, calibration, "hessian", zero)
    for i in range(len(model.model.layers)):
        layer = f"model.layers.{i}."
        assert seen[layer + "self_attn.q_proj"].abs().sum() > 0
        assert seen[layer + "mlp.gate_proj"].abs().sum() > 0  # the residual stream still carries the input
        assert torch.equal(seen[layer + "self_attn.o_proj"], torch.zeros_like(seen[layer + "self_attn.o_proj"]))
        assert torch.equal(seen[layer + "mlp.down_proj"], torch.zeros_like(seen[layer + "mlp.down_proj"]))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padded_calibration_prunes_as_the_packed_row(tiny, method):
    """Where the model runs SDPA the calibration sequences go through a block as one packed row (no padding,
    attention within each sequence); with another attention they are one right-padded batch whose padding is
    left out of the statistics and attends nowhere. Both prune the same weights, up to rounding."""
    from training.optimize import calibration_batch, prunable_linears, prune

    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 250, (1, n), generator=gen) for n in (12, 31, 7, 20, 16)]
    flat, padded = calibration_batch(calibration, True), calibration_batch(calibration, False)
    assert flat["input_ids"].shape == (1, 86) and flat["doc_lengths"] == (12, 31, 7, 20, 16)
    assert flat["position_ids"][0, 12:15].tolist() == [0, 1, 2]
    assert padded["input_ids"].shape == (5, 31) and padded["attention_mask"].sum(1).tolist() == [12, 31, 7, 20, 16]
    packed, eager = copy.deepcopy(tiny), copy.deepcopy(tiny)
    eager.set_attn_implementation("eager")
    prune(packed, method, 0.3, calibration)
    prune(eager, method, 0.3, calibration)
    for (name, a), (_, b) in zip(prunable_linears(packed), prunable_linears(eager)):
        assert torch.equal(a.weight == 0, b.weight == 0), name
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("n", [7, 64, 301])
def test_upper_inverse_by_halves_is_the_inverse(n):
    """The triangular inverse by halves (uneven ones at 301, with a leaf of 16) is the inverse, upper triangular."""
    from training.optimize import upper_inverse

    g = torch.Generator().manual_seed(n)
    V = torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64)) + n * torch.eye(n, dtype=torch.float64)
    inv = upper_inverse(V, leaf=16)
    assert torch.equal(inv, torch.triu(inv))
    torch.testing.assert_close(inv @ V, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(inv, torch.linalg.inv(V), rtol=1e-10, atol=1e-12)


def test_sparsegpt_on_stacked_linears_prunes_each_as_if_alone():
    """q, k and v share one Hessian and are pruned as one stacked matrix: the weights and masks are those of
    each pruned alone, each keeping its own 30%, not 30% of the stack."""
    import torch

    from training.optimize import _damped_inverse, sparsegpt_weights

    g = torch.Generator().manual_seed(7)
    cols = 96
    X = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    Hinv, dead = _damped_inverse(X.T @ X, 0.01)
    # rows of different scales: a mask chosen over the whole stack would prune the small one far more
    Ws = [torch.randn(r, cols, generator=g, dtype=torch.float64) * s for r, s in ((40, 1.0), (16, 0.01), (16, 10.0))]
    alone = [sparsegpt_weights(W.clone(), Hinv, dead, 0.3, 32) for W in Ws]
    stacked = sparsegpt_weights(torch.cat(Ws), Hinv, dead, 0.3, 32, groups=[40, 16, 16]).split([40, 16, 16])
    for a, b in zip(alone, stacked):
        assert torch.equal(a == 0, b == 0)
        assert abs(float((b == 0).double().mean()) - 0.3) < 0.01
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_damped_inverse_is_the_cholesky_factor_of_the_inverse():
    """U is upper triangular with a positive diagonal and U^T U = (H + damping)^-1: SparseGPT's
    cholesky(cholesky_inverse(cholesky(H)), upper=True), up to rounding."""
    import torch

    from training.optimize import _damped_inverse

    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 50, generator=g, dtype=torch.float64) @ torch.randn(50, 50, generator=g, dtype=torch.float64)
    X[:, 7] = 0
    H = X.T @ X
    U, dead = _damped_inverse(H, 0.01)
    assert dead.nonzero().flatten().tolist() == [7]
    Hd = H.clone()
    Hd[7, 7] = 1
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(50, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    assert torch.equal(U, U.triu()) and bool((torch.diag(U) > 0).all())
    torch.testing.assert_close(U, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(U.T @ U @ Hd, torch.eye(50, dtype=torch.float64), rtol=0, atol=1e-9)


def test_autocast_weights_gives_autocasts_products_bit_for_bit_and_puts_the_fp32_weights_back(tiny):
    """Scoring passes hold the Linears' weights in bf16 for the pass instead of autocast casting them per call:
    the logits are autocast's own, bit for bit; the tied embedding stays fp32 (its lookup is not autocast),
    and afterwards every parameter is the fp32 object it was, unchanged."""
    from erpops.device import Runtime, autocast_weights

    assert tiny.lm_head.weight is tiny.get_input_embeddings().weight  # tied, as SmolLM2's
    before = {n: (p, p.detach().clone()) for n, p in tiny.named_parameters(remove_duplicate=False)}
    ids = torch.randint(0, tiny.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = tiny(input_ids=ids).logits
        with autocast_weights(tiny, Runtime("cpu", "bfloat16")) as swapped, torch.autocast("cpu", dtype=torch.bfloat16):
            assert swapped == 2 * 7 + 1  # every decoder Linear and the head
            assert tiny.lm_head.weight.dtype == torch.bfloat16
            assert tiny.get_input_embeddings().weight.dtype == torch.float32
            got = tiny(input_ids=ids).logits
    assert torch.equal(got, expected)
    after = dict(tiny.named_parameters(remove_duplicate=False))
    assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in before.items())
    with autocast_weights(tiny, Runtime("cpu", "float32")) as swapped:  # no autocast: nothing to hold
        assert swapped == 0


def test_gram_is_the_fp32_product_for_bf16_inputs_and_stays_ieee_for_others():
    """SparseGPT's Hessian X^T X: an input that arrived in bf16 may go through oneDNN's bf16 path (its elements
    are exact in bf16; the accumulation stays fp32), an fp32 input may not (the bf16 path would round it). Both
    must match the float64 product as closely as an IEEE fp32 product does, and the precision setting is back."""
    from erpops.device import gram

    g = torch.Generator().manual_seed(0)
    before = torch.backends.mkldnn.matmul.fp32_precision
    for x in (torch.randn(700, 192, generator=g).bfloat16(), torch.randn(700, 192, generator=g)):
        exact = x.double().T @ x.double()
        ieee = (x.float().T @ x.float()).double()
        got = gram(x)
        assert got.dtype == torch.float32
        tolerance = 4 * (ieee - exact).abs().max().item()  # an fp32 product's own rounding, with room
        assert (got.double() - exact).abs().max().item() <= tolerance
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_shared_gguf_reader_reads_what_ggufs_own_reader_reads(tiny_model_dir, tmp_path):
    """The shared reader slices the file as a plain array: every field part and tensor is the bytes, dtype and
    shape gguf's reader gives (transformers reads nothing else). Within the block a file is parsed once; after
    it gguf's reader is back."""
    import gguf
    import numpy as np

    from training.gguf import _array_reader, convert, shared_gguf_reader

    path = convert(tiny_model_dir, tmp_path / "model-q8_0.gguf", "q8_0")
    ours, theirs = _array_reader(gguf.GGUFReader)(path), gguf.GGUFReader(path)
    assert type(ours.data) is np.memmap  # the file stays mapped, not read into memory
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields["tokenizer.ggml.tokens"].data) > 100
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.data == field.data, name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data.dtype) for t in ours.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist(), t.data.dtype) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))

    original = gguf.GGUFReader
    with shared_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and isinstance(first, original) and type(first) is not original
    assert gguf.GGUFReader is original
