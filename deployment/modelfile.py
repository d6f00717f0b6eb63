"""The Ollama Modelfile for a GGUF: TEMPLATE, SYSTEM and stop tokens derived from the HF chat template.

A template that does not match training is the top cause of "gibberish in Ollama"; so nothing here is
typed by hand per model: the chat family is detected from the tokenizer's own template, and the
default system prompt is read off a rendering of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
# Gemma folds a system message into the first user turn (as its HF template does)
GEMMA_TEMPLATE = (
    "{{- $system := \"\" }}{{- $first := true }}"
    "{{- range .Messages }}"
    "{{- if eq .Role \"system\" }}{{- $system = .Content }}"
    "{{- else }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
    "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>{{ $first = false }}\n"
    "{{ end }}{{ end }}<start_of_turn>model\n"
)


@dataclass(frozen=True)
class ModelfileSpec:
    template: str
    system: str | None
    stop: tuple[str, ...]
    parameters: dict

    def render(self, gguf_name: str) -> str:
        lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{self.template}"""']
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        for s in self.stop:
            lines.append(f'PARAMETER stop "{s}"')
        for k, v in self.parameters.items():
            lines.append(f"PARAMETER {k} {v}")
        return "\n".join(lines) + "\n"

    def ollama_parameters(self) -> dict:
        return {**self.parameters, "stop": list(self.stop)}


def default_system_prompt(tokenizer, start: str, end: str) -> str | None:
    """The system text the HF template inserts when a conversation has none (e.g. SmolLM2's)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    marker = f"{start}system\n"
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split(end, 1)[0]


def modelfile_spec(tokenizer, parameters: dict | None = None) -> ModelfileSpec:
    template = tokenizer.chat_template or ""
    params = {"temperature": 0.2, "num_ctx": 2048, **(parameters or {})}
    if "<|im_start|>" in template:
        return ModelfileSpec(CHATML_TEMPLATE, default_system_prompt(tokenizer, "<|im_start|>", "<|im_end|>"),
                             ("<|im_end|>", "<|im_start|>"), params)
    if "<start_of_turn>" in template:
        return ModelfileSpec(GEMMA_TEMPLATE, None, ("<end_of_turn>", "<start_of_turn>"), params)
    raise ValueError("unsupported chat template (neither ChatML nor Gemma): cannot derive an Ollama TEMPLATE")


def write_modelfile(tokenizer, gguf_path: Path, out: Path | None = None) -> tuple[Path, ModelfileSpec]:
    spec = modelfile_spec(tokenizer)
    out = out or gguf_path.parent / "Modelfile"
    out.write_text(spec.render(gguf_path.name), encoding="utf-8")
    return out, spec
