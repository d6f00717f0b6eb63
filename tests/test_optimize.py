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

    from training.gguf import GGUFVerificationError, export_and_verify

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["<|im_start|>user\n재고 이동은 어떻게 하나요?<|im_end|>\n<|im_start|>assistant\n", "How do I post a journal entry?"]
    exports = export_and_verify(tiny, tok, tiny_model_dir, tmp_path, ["f16"], prompts, {"f16": 0.95})
    g = exports["f16"]
    assert g.path.is_file() and g.tokenizer_match and g.agreement >= 0.95 and len(g.sha256) == 64
    with pytest.raises(GGUFVerificationError, match="agreement"):
        export_and_verify(tiny, tok, tiny_model_dir, tmp_path / "strict", ["f16"], prompts, {"f16": 1.01})


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
                                    "optimize": {"int8_backend": "torchao", "verify_prompts": 2,
                                                 "min_agreement": {"f16": 0.9, "q8_0": 0.5}}})
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


def test_pruning_decision_is_a_pure_threshold():
    from training.optimize import decide_pruning

    assert decide_pruning(10.0, 10.9, 1.10).keep
    d = decide_pruning(10.0, 11.2, 1.10)
    assert not d.keep and abs(d.ratio - 1.12) < 1e-9 and "falling back" in d.reason
    assert not decide_pruning(10.0, float("nan"), 1.10).keep
    assert not decide_pruning(0.0, 5.0, 1.10).keep


def test_failed_pruning_falls_back_to_the_unpruned_model(tiny_model_dir, corpus, tmp_path):
    import json

    from conftest import data_cfg
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import Recipe
    from training.lora import train_lora
    from training.optimize import optimize_model

    data = validate_data(data_cfg(corpus), tmp_path / "data")
    runtime = Runtime("cpu", "float32")
    recipe = Recipe.model_validate({"name": "t", "model": {"source": "tiny"}, "train": {"max_steps": 2, "precision": "fp32"}})
    trained = train_lora(recipe, tiny_model_dir, read_examples(data.train_path), tmp_path, runtime)
    evals = read_examples(data.eval_path)[:4]
    strict = OptimizeConfig(int8_backend="torchao", gguf_types=["f16"], ship="f16", verify_prompts=2,
                            max_prune_ppl_ratio=0.5)  # no pruned model can pass: the fallback must run
    result = optimize_model(strict, tiny_model_dir, trained.adapter_dir, evals, tmp_path / "strict", runtime)
    assert result.pruning is not None and not result.pruning.keep
    from transformers import AutoModelForCausalLM

    shipped = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert overall_sparsity(shipped) < 0.01  # the unpruned weights shipped
    saved = json.loads((tmp_path / "strict" / "optimize.json").read_text())
    assert saved["pruning"]["keep"] is False and "pruned_30pct_fp32" in [v["name"] for v in saved["variants"]]

    lenient = strict.model_copy(update={"max_prune_ppl_ratio": 100.0})
    result = optimize_model(lenient, tiny_model_dir, trained.adapter_dir, evals, tmp_path / "lenient", runtime)
    assert result.pruning.keep
    assert abs(overall_sparsity(AutoModelForCausalLM.from_pretrained(result.merged_dir)) - 0.3) < 0.01
