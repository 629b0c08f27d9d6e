"""The MLflow pyfunc of a GGUF model, logged as code ("models from code": MLflow copies this file into the model
and runs it at load; nothing is unpickled). It needs ``llama-cpp-python`` (llama.cpp) and MLflow only.

``predict(["prompt", ...])`` (or a DataFrame with a ``prompt`` column) returns the greedy completions, ``max_tokens``
(param, default 32) each; the model config carries the context size and the KV-cache type."""

import mlflow
from mlflow.pyfunc import PythonModel

KV_TYPES = {"f16": 1, "q8_0": 8}


class GgufModel(PythonModel):
    def load_context(self, context):
        import llama_cpp

        conf = context.model_config or {}
        kv = KV_TYPES[conf.get("kv_cache_type", "f16")]
        self.llm = llama_cpp.Llama(model_path=context.artifacts["gguf"], n_ctx=int(conf.get("n_ctx", 2048)),
                                   type_k=kv, type_v=kv, flash_attn=kv != KV_TYPES["f16"], verbose=False)

    def predict(self, context, model_input, params=None):
        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        n = int((params or {}).get("max_tokens", 32))
        return [self.llm.create_completion(str(p), max_tokens=n, temperature=0.0)["choices"][0]["text"]
                for p in prompts]


mlflow.models.set_model(GgufModel())
