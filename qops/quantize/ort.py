"""Post-training quantization with ONNX Runtime, driven by a hardware-target recipe.

One verb, :func:`quantize`, dispatches on the recipe's precision and mode:

- INT8 static (calibrated: min-max, percentile, entropy, distribution; optional SmoothQuant) or dynamic,
  per-tensor or per-channel, symmetric or affine, QDQ or QOperator; ``mode="auto"`` picks dynamic for
  attention/recurrent graphs and static otherwise;
- FP16 (``onnxruntime.transformers.float16``, inputs/outputs kept FP32);
- INT4 weight-only block-wise with MatMulNBits (RTN, or GPTQ with calibration data);
- non-uniform codebook weights (k-means or powers of two, :mod:`qops.quantize.codebook`);
- torchao recipes go to :mod:`qops.quantize.torch_engine`.

Every output is written under a temporary name and renamed into place, with ``<output>.recipe.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qops.artifacts import sha256_file
from qops.errors import DataError, ModelError, TargetError
from qops.quantize import graph
from qops.quantize.calib_cache import cache_file
from qops.quantize.cnn import (
    coverage_note,
    finetune_model,
    float_islands,
    integer_graph_ops,
    reconstruct_blocks,
    refine_model,
    search_model_ranges,
    wants,
    weighted_coverage,
)
from qops.quantize.codebook import quantize_model
from qops.quantize.embedding import quantize_embeddings
from qops.quantize.equalize import equalize
from qops.quantize.graph import load, name_nodes, save_model
from qops.quantize.int4 import quantize_nbits
from qops.quantize.precision import precision_map, protect_wide_layers, summarize, with_activations
from qops.quantize.readers import StreamingReader, TableCalibrationReader
from qops.quantize.result import QuantizeResult, copy_metadata, private_tempdir, publish
from qops.quantize.smoothquant import smooth
from qops.targets import Recipe

log = logging.getLogger(__name__)


def _ort_types(recipe: Recipe):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    qt = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    cm = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }
    fmt = QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator
    return qt[recipe.weight_type], qt[recipe.activation_type], cm[recipe.calibration_method], fmt


def quantize_onnx(model: Path, recipe: Recipe, output: Path, calibration, features, batch_size) -> QuantizeResult:

    if not model.is_file():
        raise ModelError(f"Model file {model} does not exist.", "pass the path of an FP32 .onnx model.")
    if model.stat().st_size == 0:
        raise ModelError(f"Model file {model} is empty (0 bytes).", "export the FP32 model again; an interrupted copy "
                         "or download leaves an empty file.")
    if model.suffix.lower() == ".pt2":
        raise ModelError(f"Target {recipe.target!r} quantizes ONNX models, but {model.name} is a PyTorch program.",
                         "export it to ONNX first (the pipeline does this for pt2 sources), or pick a torch_* target.")
    t0 = time.perf_counter()
    notes: list[str] = []
    technique: dict = {}
    rows = 0
    with private_tempdir(output.parent) as td:
        report = graph.check_model(model, upgraded_path=td / "upgraded.onnx")
        if report.upgraded_from is not None:
            notes.append(f"model upgraded from opset {report.upgraded_from} to {report.opset} before quantizing")
        external = report.external_data
        if external:
            notes.append("model uses external data (> 2 GB protobuf limit): output written with external data")
        mode = recipe.mode
        if mode == "auto":
            mode = graph.choose_mode(report.kind)
            notes.append(f"mode auto -> {mode} ({report.kind} graph)")
        needs_cal = (recipe.precision == "int8" and mode == "static") or \
            (recipe.precision == "int4" and recipe.algorithm in ("gptq", "awq"))
        if needs_cal and calibration is None:
            what = recipe.algorithm.upper() if recipe.precision == "int4" else "static quantization"
            raise DataError(
                f"Target {recipe.target!r} uses {what}, "
                "which needs a calibration set.",
                "pass --calibration FILE (parquet/CSV with the model's feature columns), e.g. from `qops calibrate`.",
            )
        full = graph.load(report.path)
        graph.name_nodes(full)
        _map_excluded(model, full, recipe.nodes_to_exclude)  # unknown node names: an error naming the closest
        named = td / "named.onnx"
        save_model(full, named, external)
        reader = None
        if recipe.smooth_quant_alpha is not None and recipe.precision == "int8" and calibration is None:
            raise DataError(f"Target {recipe.target!r} uses SmoothQuant, which measures activations on a calibration "
                            "set.", "pass --calibration FILE, or drop smooth_quant_alpha.")
        uses_cal = needs_cal or (recipe.smooth_quant_alpha is not None and recipe.precision == "int8")
        if uses_cal:
            # static INT8 calibrates in bounded batches, one batch per ONNX Runtime collection (StreamingReader):
            # peak memory is one batch's intermediate tensors, whatever the number of rows
            static = recipe.precision == "int8" and mode == "static"
            reader = TableCalibrationReader(str(calibration), str(model), features,
                                            recipe.calibration_batch if static else batch_size)
            if reader.total_rows == 0:
                raise DataError(f"The calibration set {calibration} has no rows.",
                                "select a non-empty calibration set (qops calibrate).")
        elif calibration is not None:
            why = (f"mode {recipe.mode} -> {mode}" if recipe.mode == "auto" else f"mode {mode}")
            msg = (f"calibration set {Path(str(calibration)).name} NOT used: target {recipe.target} quantizes with "
                   f"{why} ({recipe.precision}), which takes no calibration data; set target_options "
                   "mode: static or smooth_quant_alpha to use it")
            log.warning("%s", msg)
            notes.append(msg)
        q = td / "q.onnx"
        if recipe.precision == "int8" and mode in ("static", "dynamic"):
            technique = _int8(named, q, recipe, mode, reader, external, td, report.kind)
        elif recipe.precision == "int8":  # weight_only: 8-bit MatMulNBits
            technique = quantize_nbits(named, q, recipe, 8, reader, external)
        elif recipe.precision == "int4":
            technique = quantize_nbits(named, q, recipe, 4, reader, external)
            notes += technique.pop("notes", [])
        elif recipe.precision == "fp16":
            technique = _fp16(named, q, recipe, external)
        elif recipe.precision == "codebook":
            m, technique = quantize_model(graph.load(named), recipe.op_types, recipe.codebook, recipe.codebook_bits,
                                          recipe.nodes_to_exclude, per_channel=recipe.per_channel)
            save_model(m, q, external)
            notes.append("non-uniform codebook weights save size, not time: weights are decoded to FP32 when the "
                         "model loads, so memory use and latency are FP32's")
        else:  # pragma: no cover - Recipe validation rejects other combinations
            raise ModelError(f"No ONNX Runtime path for precision {recipe.precision!r}.", "pick another target.")
        if reader is not None:
            rows = reader.rows or reader.total_rows
        stripped = copy_metadata(model, q, external)
        if stripped >= 1000:  # a kB or more (a tiny or negative difference is protobuf noise)
            notes.append(f"exporter debug metadata on nodes dropped from the quantized file ({stripped / 1e3:.0f} kB)")
        counts = _op_counts(q)
        technique["quantized_ops"] = {k: v for k, v in counts.items() if k in _QUANT_OPS}
        qm = graph.load(q, external=False)
        technique["weighted_nodes"] = weighted_coverage(graph.load(model, external=False), qm)
        technique["precision"] = precision_map(qm)
        technique["precision_summary"] = summarize(technique["precision"])
        note = coverage_note(technique["weighted_nodes"])
        if note and recipe.precision != "fp16":
            notes.append(note)
        if mode == "static" and recipe.precision == "int8" and recipe.quant_format == "QDQ":
            technique["float_islands"] = float_islands(q)  # what ORT runs in float after fusing the QDQ graph
            if technique.get("integer_graph"):
                report.unquantizable = technique["float_islands"]["float_ops"]
        if recipe.precision == "codebook" and technique.get("weights"):
            technique["quantized_ops"]["codebook weights"] = technique["weights"]
        if not technique["quantized_ops"] and recipe.precision != "fp16":
            raise ModelError(
                f"Target {recipe.target!r} found nothing to quantize in {model.name}: no "
                f"{'/'.join(recipe.op_types)} node with constant weights (ops: {sorted(report.op_counts)}).",
                "pick a target whose op_types match the model (e.g. int4 needs MatMul/Gemm weights), or "
                "set target_options op_types.")
        report_d = report.to_dict()
        report_d["left_fp32"] = {"excluded_nodes": list(recipe.nodes_to_exclude),
                                 "ops_without_quantized_kernels": report.unquantizable}
        if report.unquantizable:
            notes.append("left in FP32 (no quantized kernel): " +
                         ", ".join(f"{k} x{v}" for k, v in report.unquantizable.items()))

        def result_for(path: Path) -> QuantizeResult:
            src_size, out_size = graph.model_size(model), graph.model_size(path)
            return QuantizeResult(
                target=recipe.target, model_path=str(output), model_sha256=sha256_file(path),
                recipe_path=str(output.with_suffix(output.suffix + ".recipe.json")), source_path=str(model),
                source_sha256=sha256_file(model), size_bytes=out_size, source_size_bytes=src_size,
                size_ratio=round(out_size / src_size, 4),
                calibration_path=str(calibration) if reader is not None else None, calibration_rows=rows,
                seconds=round(time.perf_counter() - t0, 3), recipe=recipe.to_dict(), mode=mode,
                graph_kind=report.kind, model_report=report_d, technique=technique, notes=notes,
                engine_name="onnxruntime")

        return publish(q, output, result_for, external)


_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearMatMul", "QLinearConv", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
              "QAttention", "GatherBlockQuantized"}


def _ort_default_ops(mode: str, recipe: Recipe) -> list[str]:
    """The op types ONNX Runtime quantizes when given none: its registry for the mode and format."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    if mode == "dynamic":
        return sorted(IntegerOpsRegistry)
    return sorted(QDQRegistry if recipe.quant_format == "QDQ" else QLinearOpsRegistry)


def _op_counts(path: Path) -> dict:
    from collections import Counter

    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def _int8(src: Path, dst: Path, recipe: Recipe, mode: str, reader, external: bool, td: Path, kind: str) -> dict:
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = td / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                          all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    except Exception as e:
        log.warning("quant_pre_process failed (%s); quantizing the model as it is", e)
        pre = src
    m = graph.load(pre)
    graph.name_nodes(m)  # the optimizer may have fused nodes into new, unnamed ones
    # value_info is only a cache of inferred shapes; exporters (torch.onnx dynamo) and the optimizer can leave
    # entries that contradict the rewritten graph, and ORT's quantizer re-infers shapes strictly
    del m.graph.value_info[:]
    technique: dict = {"kind": "int8", "mode": mode}
    if recipe.smooth_quant_alpha is not None:
        technique["smooth_quant"] = smooth(m, reader, recipe.smooth_quant_alpha, nodes_to_exclude=recipe.nodes_to_exclude)
    op_types = list(recipe.op_types)
    if recipe.embedding_granularity == "per-row" and (not op_types or "Gather" in op_types):
        technique["embeddings"] = quantize_embeddings(m, nodes_to_exclude=recipe.nodes_to_exclude)
        if technique["embeddings"]["tables"]:  # the row scales are Gathers too: ORT must not quantize them
            op_types = [o for o in (op_types or _ort_default_ops(mode, recipe)) if o != "Gather"]
    if mode == "static" and recipe.equalization != "off":
        def batches():
            reader.rewind()
            return iter(reader.get_next, None)

        technique["equalization"] = equalize(m, batches, mode=recipe.equalization,
                                             nodes_to_exclude=recipe.nodes_to_exclude)
    pre2 = td / "prepared.onnx"
    save_model(m, pre2, external)
    wt, at, cm, fmt = _ort_types(recipe)
    extra = {"WeightSymmetric": recipe.symmetric_weights, "ActivationSymmetric": recipe.symmetric_activations}
    exclude = _map_excluded(src, m, recipe.nodes_to_exclude)
    if mode == "static":
        if recipe.calibration_method == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        if wants(recipe.integer_graph, kind):
            op_types = integer_graph_ops(op_types)
            technique["integer_graph"] = True
            if exclude:  # a layer kept out of INT8 keeps its Relu/Clip with it (see qops.quantize.precision)
                exclude = with_activations(m, exclude)
        log.info("static INT8 for %s: calibrating (%s) on %s", recipe.target, recipe.calibration_method, reader.path)
        reader.rewind()
        extra["CalibStridedMinMax"] = 1  # with StreamingReader: ONNX Runtime collects one batch at a time
        cache = cache_file(pre2, reader, cm, op_types, extra)  # the tuner's trials share ranges (calib_cache)
        technique["calibration_reused"] = bool(cache and cache.is_file())
        if technique["calibration_reused"]:
            log.info("static INT8: activation ranges reused from an earlier trial (%s)", cache.name)
        quantize_static(
            str(pre2), str(dst), StreamingReader(reader), quant_format=fmt, op_types_to_quantize=op_types or None,
            per_channel=recipe.per_channel, reduce_range=recipe.reduce_range, activation_type=at, weight_type=wt,
            calibrate_method=cm, nodes_to_exclude=exclude, use_external_data_format=external, extra_options=extra,
            calibration_cache_path=str(cache) if cache else None,
        )
        technique["calibration_method"] = recipe.calibration_method
        technique["calibration_batch"] = recipe.calibration_batch
        if recipe.quant_format == "QDQ":  # before refinement: it measures the model as it will run
            qm = graph.load(dst)
            protected = protect_wide_layers(qm)
            if protected:  # ONNX Runtime would quantize their float weights per tensor when the model loads
                save_model(qm, dst, external)
                technique["int16_weights"] = protected
        if recipe.quant_format == "QDQ" and (wants(recipe.bias_correction, kind) or recipe.learned_rounding):
            technique["refinement"] = refine_model(dst, pre2, reader, recipe, kind, external)
        if recipe.quant_format == "QDQ" and wants(recipe.range_search, kind):
            technique["range_search"] = search_model_ranges(dst, pre2, reader, recipe, external)
        if recipe.quant_format == "QDQ" and recipe.block_iters > 0:
            technique["block_reconstruction"] = reconstruct_blocks(dst, pre2, reader, recipe, external)
        if recipe.quant_format == "QDQ" and recipe.finetune_steps > 0:
            technique["finetune"] = finetune_model(dst, pre2, reader, recipe, external)
    else:
        log.info("dynamic INT8 for %s", recipe.target)
        quantize_dynamic(
            str(pre2), str(dst), op_types_to_quantize=op_types or None, per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range, weight_type=wt, nodes_to_exclude=exclude,
            use_external_data_format=external, extra_options=extra,
        )
    technique.update(granularity=recipe.granularity, excluded_nodes=exclude,
                     op_types=op_types or "all ops ONNX Runtime quantizes")
    return technique


def _map_excluded(original_path: Path, prepared, names) -> list[str]:
    """Names in ``prepared`` of the nodes to keep in FP32, given by their names in the model at ``original_path``
    (the optimizer may rename or fuse nodes: they are matched by the tensor they produce)."""
    if not names:
        return []

    import difflib

    original = load(original_path, external=False)
    name_nodes(original)
    known = {n.name: n.op_type for n in prepared.graph.node}
    producer = {o: n.name for n in prepared.graph.node for o in n.output}
    outputs = {n.name: n.output[0] for n in original.graph.node if n.output}
    out = []
    missing = []
    for name in names:
        if name in known:
            out.append(name)
        elif outputs.get(name) in producer:
            out.append(producer[outputs[name]])
        else:
            missing.append(name)
    if missing:
        every = sorted(set(outputs) | set(known))
        close = list(dict.fromkeys(c for m in missing for c in difflib.get_close_matches(m, every, n=3, cutoff=0.4)))
        raise TargetError(
            f"nodes_to_exclude names {missing}, which {'is' if len(missing) == 1 else 'are'} not a node of "
            f"{Path(original_path).name}.",
            f"use node names of the graph (closest: {close or every[:8]}); the trial table and "
            "`qops quantize --tune` list them.")
    # ORT's dynamic quantizer rewrites Gemm as MatMul (+Add) named '<name>_MatMul' before it quantizes
    out += [f"{n}_MatMul" for n in out if known.get(n) == "Gemm"]
    return out


def _fp16(src: Path, dst: Path, recipe: Recipe, external: bool) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = graph.load(src)
    out = convert_float_to_float16(m, keep_io_types=True, node_block_list=list(recipe.nodes_to_exclude) or None)
    save_model(out, dst, external)
    return {"kind": "fp16", "io_types": "float32 (kept)", "excluded_nodes": list(recipe.nodes_to_exclude)}
