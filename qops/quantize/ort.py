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

import contextlib
import copy
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from qops import __version__
from qops.artifacts import atomic_path, clean_stale_temps, sha256_file, temp_prefix, write_json_atomic
from qops.data import data_kind, feature_matrix, onnx_io, read_table
from qops.errors import DataError, ModelError, TargetError
from qops.quantize.cnn import (
    coverage_note,
    finetune_model,
    float_islands,
    integer_graph_ops,
    refine_model,
    wants,
    weighted_coverage,
)
from qops.quantize.calib_cache import cache_file
from qops.quantize.equalize import equalize
from qops.quantize.graph import save_model
from qops.quantize.precision import precision_map, protect_wide_layers, summarize, with_activations
from qops.targets import Recipe, get_target

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    target: str
    model_path: str
    model_sha256: str
    recipe_path: str
    source_path: str
    source_sha256: str
    size_bytes: int
    source_size_bytes: int
    size_ratio: float  # output size / source size (0.25: four times smaller), as in evaluations
    calibration_path: str | None
    calibration_rows: int
    seconds: float
    recipe: dict = field(default_factory=dict)
    mode: str | None = None  # the mode actually used ("auto" resolved)
    graph_kind: str | None = None
    engine: str = "onnxruntime"
    model_report: dict = field(default_factory=dict)  # opset, upgrade, external data, ops left in FP32
    technique: dict = field(default_factory=dict)  # what the technique did (SmoothQuant, codebook, INT4...)
    notes: list = field(default_factory=list)
    trials: list = field(default_factory=list)  # accuracy-aware tuning: one row per candidate
    tuning: dict = field(default_factory=dict)
    passed: bool | None = None  # tuning: whether the written candidate passed the gates (None: not tuned)


class TableCalibrationReader:
    """ONNX Runtime CalibrationDataReader over a calibration file, yielding feeds keyed by input name.

    ``features`` is a list of tabular feature columns or a :class:`~qops.data.DataKind`; a ``.npz`` of arrays
    named like the inputs (the calibrate stage's materialised feeds) is read as such. Parquet is read batch
    by batch (only the kind's columns), so a large calibration file is never held in memory as one tensor.
    Iterable too (GPTQ's data loader iterates a copy).
    """

    def __init__(self, path: str, model_path: str, features, batch_size: int = 64):
        self.path, self.batch_size = str(path), batch_size
        self.inputs = onnx_io(model_path)[0]
        self.features = data_kind(str(model_path), features, self.path)
        self._it: Iterator[dict] | None = None
        self.rows = 0
        self._t0 = self._last = time.monotonic()

    @functools.cached_property
    def total_rows(self) -> int:
        """Rows of the calibration file (parquet: from its metadata, without reading it)."""
        return _count_rows(self.path)

    def _progress(self) -> None:
        """A log line every 10 s while rows are read (a large calibration set takes minutes)."""
        now = time.monotonic()
        if now - self._last >= 10:
            self._last = now
            log.info("calibration: %d rows of %s read in %.0f s", self.rows, Path(self.path).name, now - self._t0)

    def _batches(self) -> Iterator[dict]:
        p = Path(self.path)
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(p)
            cols = self.features.columns()
            missing = [c for c in cols if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"The calibration set {p} lacks column(s) {missing} ({self.features.kind} data); it "
                                f"has {pf.schema_arrow.names[:30]}.",
                                "select the calibration set from data with the model's features.")
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=cols):
                df = batch.to_pandas()
                self.rows += len(df)
                self._progress()
                yield feature_matrix(df, self.inputs, self.features, f"calibration set {p.name}")
        else:
            df = read_table(p, "calibration set")
            for start in range(0, len(df), self.batch_size):
                chunk = df.iloc[start : start + self.batch_size]
                self.rows += len(chunk)
                self._progress()
                yield feature_matrix(chunk, self.inputs, self.features, f"calibration set {p.name}")

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
        self.rows = 0
        self._t0 = self._last = time.monotonic()

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def __deepcopy__(self, memo):  # a generator cannot be copied: the copy starts from the beginning
        c = copy.copy(self)
        c._it, c.rows = None, 0
        return c


class StreamingReader:
    """Feeds ONNX Runtime's calibrator one batch per ``collect_data`` call (with ``CalibStridedMinMax=1`` its loop
    calls :meth:`set_range` per batch), so it never holds more than one batch's intermediate tensors: min-max
    ranges and histograms (percentile, entropy, distribution) are merged batch by batch. Batches are read in order
    from the table reader (ONNX Runtime asks for the ranges in order)."""

    def __init__(self, reader: TableCalibrationReader):
        self.reader, self._left = reader, 0
        self._batches = -(-reader.total_rows // reader.batch_size)

    def __len__(self) -> int:
        return self._batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self) -> dict | None:
        if self._left <= 0:
            return None
        self._left -= 1
        return self.reader.get_next()


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


def resolve_recipe(target: str | Recipe, options: dict | None = None) -> Recipe:
    recipe = target if isinstance(target, Recipe) else get_target(target)
    return recipe.with_options(**options) if options else recipe


def quantize(
    model: str | os.PathLike,
    target: str | Recipe,
    output: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    batch_size: int = 64,
    options: dict | None = None,
) -> QuantizeResult:
    """Quantize an FP32 model for a hardware target; writes ``output`` and ``<output>.recipe.json``.

    ``options`` override recipe fields (validated), e.g. ``{"calibration_method": "percentile"}``.
    """
    recipe = resolve_recipe(target, options)
    check_output_path(model, output)
    if recipe.engine == "torchao":
        from qops.quantize.torch_engine import quantize_torch

        return quantize_torch(model, recipe, output, calibration=calibration, features=features,
                              batch_size=batch_size)
    return _quantize_onnx(Path(model), recipe, Path(output), calibration, features, batch_size)


def check_output_path(model: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an ``output`` that is the source model itself (the same path, a symlink or a hard link of it): the
    FP32 source would be overwritten and the recipe would record source hash == model hash."""
    m, o = Path(model), Path(output)
    same = m.resolve() == o.resolve()
    if not same and o.exists() and m.exists():
        try:
            same = os.path.samefile(m, o)
        except OSError:
            same = False
    if same:
        raise DataError(f"--output {o} is the source model {m} itself (the same file{' via a link' if m != o else ''}): "
                        "quantizing would overwrite the FP32 model.",
                        "write the quantized model to another path, e.g. --output model.int8.onnx.")


@contextlib.contextmanager
def private_tempdir(folder: Path):
    """A temporary folder beside the output (``.qops-tmp-<pid>-*``), also used by ONNX Runtime's own temporary
    files while it is open (``tempfile.tempdir``), so a killed quantization leaves nothing in the system's TMPDIR
    and the next quantization into the same folder removes what it left."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in clean_stale_temps(folder):
        log.info("removed %s, left by a quantization that was killed", folder / name)
    td = Path(tempfile.mkdtemp(prefix=temp_prefix("quant-"), dir=folder))
    previous = tempfile.tempdir
    tempfile.tempdir = str(td)
    try:
        yield td
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(td, ignore_errors=True)


def _quantize_onnx(model: Path, recipe: Recipe, output: Path, calibration, features, batch_size) -> QuantizeResult:

    from qops.quantize import graph

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
            from qops.quantize.codebook import quantize_model

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
                graph_kind=report.kind, model_report=report_d, technique=technique, notes=notes)

        return publish(q, output, result_for, external)


def publish(tmp: Path, output: Path, result_for, external: bool = False) -> QuantizeResult:
    """Put a finished model and its recipe in place as a pair: the recipe (naming the model's sha256) first, the
    model last, each by an atomic rename. A kill in between leaves a recipe whose hash does not match the model
    at ``output`` (or no model): :func:`verify_pair` tells, and no reader ever sees a model without its recipe.
    Models with external data are moved first (their data file is renamed before the model file)."""
    if external:
        move_model(tmp, output, external)
    result = result_for(output if external else tmp)
    write_recipe(result)
    if not external:
        os.replace(tmp, output)  # the temporary folder is beside the output: one file system
    return result


def write_recipe(result: QuantizeResult) -> None:
    """``<model>.recipe.json``: the recipe used and the result, with the model's sha256."""
    write_json_atomic(result.recipe_path, {"recipe": result.recipe, "result": result, "qops_version": __version__})


def verify_pair(model: str | os.PathLike) -> dict:
    """The recipe of ``model`` (``<model>.recipe.json``), checked to describe this very file (its sha256)."""
    from qops.artifacts import read_json

    m = Path(model)
    recipe = m.with_suffix(m.suffix + ".recipe.json")
    if not m.is_file() or not recipe.is_file():
        raise ModelError(f"{m} has no {'model' if not m.is_file() else 'recipe ' + recipe.name} beside it: the "
                         "quantization that wrote it did not finish.", "quantize again to the same output.")
    data = read_json(recipe)
    if data.get("result", {}).get("model_sha256") != sha256_file(m):
        raise ModelError(f"{recipe.name} does not describe {m.name} (sha256 differs): the quantization that wrote "
                         "them was interrupted between the two.", "quantize again to the same output.")
    return data


_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearMatMul", "QLinearConv", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
              "QAttention", "GatherBlockQuantized"}


def _count_rows(calibration) -> int:
    p = Path(str(calibration))
    if p.suffix.lower() in (".parquet", ".pq") and p.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable: read_table names the problem
            pass
    return len(read_table(calibration, "calibration set"))


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

    from qops.quantize import graph

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
        from qops.quantize.smoothquant import smooth

        technique["smooth_quant"] = smooth(m, reader, recipe.smooth_quant_alpha, nodes_to_exclude=recipe.nodes_to_exclude)
    op_types = list(recipe.op_types)
    if recipe.embedding_granularity == "per-row" and (not op_types or "Gather" in op_types):
        from qops.quantize.embedding import quantize_embeddings

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
    from qops.quantize.graph import load

    import difflib

    from qops.quantize.graph import name_nodes

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


def quantize_nbits(src: Path, dst: Path, recipe: Recipe, bits: int, reader, external: bool) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    from qops.quantize import graph

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
        from qops.quantize.awq import apply_awq

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


def _fp16(src: Path, dst: Path, recipe: Recipe, external: bool) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from qops.quantize import graph

    m = graph.load(src)
    out = convert_float_to_float16(m, keep_io_types=True, node_block_list=list(recipe.nodes_to_exclude) or None)
    save_model(out, dst, external)
    return {"kind": "fp16", "io_types": "float32 (kept)", "excluded_nodes": list(recipe.nodes_to_exclude)}


def move_model(tmp: Path, output: Path, external: bool) -> None:
    """Move the finished model into place: external data first, the model file last (atomic rename)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if external:
        import onnx

        m = onnx.load(str(tmp))  # loads external data from beside tmp
        with tempfile.TemporaryDirectory(prefix=".qops-", dir=output.parent) as staging:
            s = Path(staging) / output.name
            onnx.save(m, str(s), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=output.name + ".data", size_threshold=1024)
            os.replace(Path(staging) / (output.name + ".data"), output.parent / (output.name + ".data"))
            os.replace(s, output)
        return
    with atomic_path(output) as t:
        shutil.copyfile(tmp, t)


def copy_metadata(src: Path, dst: Path, external: bool = False) -> int:
    """Carry the source model's metadata_props (feature columns etc.) into the quantized model and drop the
    exporter's per-node debug metadata from it, in one load and save. Returns the debug bytes dropped."""
    import onnx

    from qops.quantize.graph import strip_debug_metadata

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst), load_external_data=False)
    have = {p.key for p in d.metadata_props}
    for p in s.metadata_props:
        if p.key not in have:
            e = d.metadata_props.add()
            e.key, e.value = p.key, p.value
    e = d.metadata_props.add()
    e.key, e.value = "qops.quantized_by", f"qops {__version__}"
    stripped = strip_debug_metadata(d)
    onnx.save(d, str(dst))  # external data references (locations) are kept as they are
    return stripped
