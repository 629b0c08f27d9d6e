"""INT4 (and other n-bit) weight-only quantization of graph models with ONNX Runtime's ``MatMulNBits`` quantizer:
RTN, GPTQ, AWQ scales, block sizes, and the INT4 embedding tables. (HQQ and k-quant are decoder-LLM algorithms: the
``ort_genai`` engine runs them, :mod:`qops.llm.quantize`; a graph recipe asking for them is refused.)"""

from __future__ import annotations

import logging
from pathlib import Path

from qops.quantize import graph
from qops.quantize.awq import apply_awq
from qops.quantize.graph import save_model
from qops.targets import Recipe

log = logging.getLogger(__name__)


def quantize_nbits(src: Path, dst: Path, recipe: Recipe, bits: int, reader, external: bool) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per-node chatter
    m = graph.load(src)
    converted = graph.gemm_to_matmul(m)
    graph.name_nodes(m)
    ops = tuple(o for o in recipe.op_types if o in ("MatMul", "Gather"))
    if recipe.algorithm == "gptq":
        ops = ("MatMul",)  # GPTQ (Intel Neural Compressor) handles MatMul weights only
    notes = []
    if "Gather" in ops and graph.default_opset(m) < 21:
        # block-quantized embeddings (GatherBlockQuantized) need INT4 tensors: opset 21
        from onnx import version_converter

        try:
            m = version_converter.convert_version(m, 21)
        except Exception as e:  # noqa: BLE001 - fall back to MatMul only, and say so
            ops = ("MatMul",)
            notes.append(f"embeddings (Gather) left in FP32: upgrading to opset 21 failed ({str(e)[:120]})")
    if recipe.algorithm == "awq":
        notes.append("AWQ: weights scaled per input channel by mean |activation|^alpha on the calibration rows "
                     "(alpha searched per activation), then round-to-nearest")
        awq_report = apply_awq(m, reader, recipe.block_size, recipe.symmetric_weights, recipe.nodes_to_exclude)
    if recipe.algorithm == "gptq":
        reader.rewind()
        algo = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=recipe.block_size,
                                         percdamp=0.01, actorder=False, mse=False, perchannel=True)
    else:
        emb_block = recipe.embedding_block_size or recipe.block_size
        split = "Gather" in ops and emb_block != recipe.block_size  # embeddings in a second pass, own block size
        algo = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric_weights,
                                            accuracy_level=recipe.accuracy_level, quant_format=QuantFormat.QOperator,
                                            op_types_to_quantize=tuple(o for o in ops if o != "Gather" or not split),
                                            bits=bits)
    if recipe.algorithm == "gptq":
        tmp = dst.with_name("gptq_in.onnx")
        save_model(m, tmp, external)
        q = MatMulNBitsQuantizer(str(tmp), bits=bits, block_size=recipe.block_size,
                                 is_symmetric=recipe.symmetric_weights, accuracy_level=recipe.accuracy_level,
                                 nodes_to_exclude=list(recipe.nodes_to_exclude), algo_config=algo)
    else:
        q = MatMulNBitsQuantizer(m, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric_weights,
                                 accuracy_level=recipe.accuracy_level, nodes_to_exclude=list(recipe.nodes_to_exclude),
                                 algo_config=algo)
    log.info("INT%d weight-only (%s, block %d) for %s", bits, recipe.algorithm, recipe.block_size, recipe.target)
    q.process()
    out = q.model.model if hasattr(q.model, "model") else q.model
    if recipe.algorithm != "gptq" and split:
        emb = DefaultWeightOnlyQuantConfig(block_size=emb_block, is_symmetric=recipe.symmetric_weights,
                                           accuracy_level=recipe.accuracy_level, quant_format=QuantFormat.QOperator,
                                           op_types_to_quantize=("Gather",), bits=bits)
        q = MatMulNBitsQuantizer(out, bits=bits, block_size=emb_block, is_symmetric=recipe.symmetric_weights,
                                 accuracy_level=recipe.accuracy_level, nodes_to_exclude=list(recipe.nodes_to_exclude),
                                 algo_config=emb)
        q.process()
        out = q.model.model if hasattr(q.model, "model") else q.model
        notes.append(f"embedding tables (Gather) in INT4 blocks of {emb_block}")
    kept = [n.name for n in out.graph.node if n.name in set(recipe.nodes_to_exclude) and n.op_type == "MatMul"]
    technique = {"kind": f"int{bits}_weight_only", "algorithm": recipe.algorithm, "block_size": recipe.block_size,
                 "embedding_block_size": recipe.embedding_block_size or recipe.block_size, "symmetric": recipe.symmetric_weights, "accuracy_level": recipe.accuracy_level,
                 "gemm_rewritten_as_matmul": converted, "op_types": list(ops), "notes": notes}
    if recipe.algorithm == "awq":
        technique["awq"] = awq_report
    if kept and recipe.fallback_precision == "int8":
        # mixed precision: the layers kept out of INT4 get dynamic INT8 weights (per channel) instead of FP32
        from onnxruntime.quantization import QuantType, quantize_dynamic

        nbits = dst.with_name(dst.stem + "quantize_nbits.onnx")
        save_model(out, nbits, external)
        quantize_dynamic(str(nbits), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=kept,
                         per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external,
                         extra_options={"DefaultTensorType": 1})  # FLOAT: shape inference stops at MatMulNBits
        technique["int8_layers"] = kept
    else:
        save_model(out, dst, external)
    return technique
