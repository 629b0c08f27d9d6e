"""Post-training quantization with ONNX Runtime, driven by a hardware-target recipe."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from qops import __version__
from qops.artifacts import atomic_path, sha256_file, write_json_atomic
from qops.data import feature_columns_for, feature_matrix, onnx_io, read_table
from qops.errors import DataError, ModelError
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
    size_ratio: float
    calibration_path: str | None
    calibration_rows: int
    seconds: float
    recipe: dict = field(default_factory=dict)


class TableCalibrationReader:
    """ONNX Runtime CalibrationDataReader over a parquet/CSV table, yielding batches of rows.

    Only the feature columns are read, batch by batch, so a large calibration file is never
    held in memory as one tensor.
    """

    def __init__(self, path: str, model_path: str, features: list[str], batch_size: int = 64):
        self.path, self.features, self.batch_size = path, features, batch_size
        self.inputs = onnx_io(model_path)[0]
        self._it: Iterator[dict] | None = None
        self.rows = 0

    def _batches(self) -> Iterator[dict]:
        p = Path(self.path)
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(p)
            missing = [c for c in self.features if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"The calibration set {p} lacks feature column(s) {missing}.",
                                "select the calibration set from data with the model's features.")
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=self.features):
                df = batch.to_pandas()
                self.rows += len(df)
                yield feature_matrix(df, self.inputs, self.features, f"calibration set {p.name}")
        else:
            df = read_table(p, "calibration set")
            for start in range(0, len(df), self.batch_size):
                chunk = df.iloc[start : start + self.batch_size]
                self.rows += len(chunk)
                yield feature_matrix(chunk, self.inputs, self.features, f"calibration set {p.name}")

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
        self.rows = 0


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


def quantize(
    model: str | os.PathLike,
    target: str | Recipe,
    output: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    batch_size: int = 64,
) -> QuantizeResult:
    """Quantize an FP32 ONNX model for a hardware target; writes ``output`` and ``<output>.recipe.json``."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    recipe = target if isinstance(target, Recipe) else get_target(target)
    model = Path(model)
    output = Path(output)
    if not model.is_file():
        raise ModelError(f"Model file {model} does not exist.", "pass the path of an FP32 .onnx model.")
    onnx_io(model)  # fails early, with a clear message, on a file that is not ONNX
    if recipe.needs_calibration and calibration is None:
        raise DataError(
            f"Target {recipe.target!r} uses static quantization, which needs a calibration set.",
            "pass --calibration FILE (parquet/CSV with the model's feature columns), e.g. from `qops calibrate`.",
        )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qops-quant-") as td:
        pre = Path(td) / "preprocessed.onnx"
        try:
            quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            log.warning("quant_pre_process failed (%s); quantizing the model as it is", e)
            pre = model
        wt, at, cm, fmt = _ort_types(recipe)
        extra = {
            "WeightSymmetric": recipe.symmetric_weights,
            "ActivationSymmetric": recipe.symmetric_activations,
        }
        rows = 0
        with atomic_path(output) as tmp:
            if recipe.mode == "static":
                feats = feature_columns_for(model, features)
                reader = TableCalibrationReader(str(calibration), str(model), feats, batch_size)
                log.info("static quantization for %s: calibrating (%s) on %s", recipe.target,
                         recipe.calibration_method, calibration)
                quantize_static(
                    str(pre), str(tmp), reader, quant_format=fmt, op_types_to_quantize=list(recipe.op_types),
                    per_channel=recipe.per_channel, reduce_range=recipe.reduce_range, activation_type=at,
                    weight_type=wt, calibrate_method=cm, extra_options=extra,
                )
                rows = reader.rows
                if rows == 0:
                    raise DataError(f"The calibration set {calibration} has no rows.",
                                    "select a non-empty calibration set (qops calibrate).")
            else:
                log.info("dynamic quantization for %s", recipe.target)
                quantize_dynamic(
                    str(pre), str(tmp), op_types_to_quantize=list(recipe.op_types), per_channel=recipe.per_channel,
                    reduce_range=recipe.reduce_range, weight_type=wt, extra_options=extra,
                )
            _copy_metadata(model, tmp)
    recipe_path = output.with_suffix(output.suffix + ".recipe.json")
    src_size, out_size = model.stat().st_size, output.stat().st_size
    result = QuantizeResult(
        target=recipe.target,
        model_path=str(output),
        model_sha256=sha256_file(output),
        recipe_path=str(recipe_path),
        source_path=str(model),
        source_sha256=sha256_file(model),
        size_bytes=out_size,
        source_size_bytes=src_size,
        size_ratio=round(src_size / out_size, 3),
        calibration_path=str(calibration) if recipe.needs_calibration else None,
        calibration_rows=rows,
        seconds=round(time.perf_counter() - t0, 3),
        recipe=recipe.to_dict(),
    )
    write_json_atomic(recipe_path, {"recipe": recipe.to_dict(), "result": result, "qops_version": __version__})
    return result


def _copy_metadata(src: Path, dst: Path) -> None:
    """Carry the source model's metadata_props (feature columns etc.) into the quantized model."""
    import onnx

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst))
    have = {p.key for p in d.metadata_props}
    for p in s.metadata_props:
        if p.key not in have:
            e = d.metadata_props.add()
            e.key, e.value = p.key, p.value
    e = d.metadata_props.add()
    e.key, e.value = "qops.quantized_by", f"qops {__version__}"
    onnx.save(d, str(dst))
