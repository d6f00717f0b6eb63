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

    # no type hints on `predict`: MLflow would build the signature from them and drop the logged one, whose
    # `max_new_tokens` param is what lets a caller's params through (a signature without params discards them)
    def predict(self, context, model_input, params=None):
        """Answers, one per question: `model_input` a list of strings, or (as MLflow passes it) a one-column
        DataFrame; `params={"max_new_tokens": n}` (128 by default)."""
        from erpops.device import Runtime
        from evaluation.scoring import generate_answers

        values = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        questions = [str(q) for q in values]
        examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}]} for q in questions]
        max_new = int((params or {}).get("max_new_tokens", 128))
        return generate_answers(self.model, self.tokenizer, examples, Runtime("cpu", "float32"), max_new)
