"""Decoder LLMs (``data.kind: causal_lm``): HF causal-LM sources exported to ONNX with a KV cache, INT4/NF4/GPU
targets, perplexity / agreement / KL and generation-speed evaluation, and QLoRA fine-tuning (docs/llm.md)."""
