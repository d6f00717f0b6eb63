"""The registered model: the shipped GGUF behind MLflow's pyfunc interface.

    model = mlflow.pyfunc.load_model("models:/erp-assistant@champion")
    model.predict(["재고 이동은 어떻게 등록하나요?"])
"""

from __future__ import annotations

import mlflow.pyfunc


class ERPAssistantModel(mlflow.pyfunc.PythonModel):
    """Answers questions with the GGUF read by transformers (the same bytes Ollama serves)."""

    def load_context(self, context):
        from pathlib import Path

        from training.gguf import load_gguf_model

        self.model, self.tokenizer = load_gguf_model(Path(context.artifacts["gguf"]))

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from erpops.device import Runtime
        from evaluation.scoring import generate_answers

        questions = [str(q) for q in model_input]
        examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]} for q in questions]
        max_new = int((params or {}).get("max_new_tokens", 128))
        return generate_answers(self.model, self.tokenizer, examples, Runtime("cpu", "float32"), max_new)
