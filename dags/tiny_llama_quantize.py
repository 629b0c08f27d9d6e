"""Quantization DAG for the decoder-LLM example, built from dags/specs/tiny_llama.yaml.

Scheduled on the Asset that tiny_llama_retrain updates (mlflow://tiny-llama/champion): ONNX export with a KV cache
(onnxruntime-genai model builder), calibration windows drift-checked on token statistics, INT4 MatMulNBits
(RTN, GPTQ, k-quant) and NF4 targets, perplexity / agreement / KL gates per news domain, generation speed, cards
and registration per target.
"""

from pathlib import Path

from qops_airflow.dag_factory import build_quantization_dag

dag = build_quantization_dag(Path(__file__).parent / "specs" / "tiny_llama.yaml", dag_id="tiny_llama_quantize")
