import json

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest

from qops.errors import DataError, ModelError, TargetError
from qops.quantize import quantize


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("target", ["x86_64_vnni_int8", "x86_64_int8_dynamic", "arm64_int8"])
def test_each_cpu_target_quantizes_and_runs(target, fp32_model, calibration_file, data_dir, features, tmp_path):
    out = tmp_path / f"{target}.onnx"
    res = quantize(fp32_model, target, out, calibration=calibration_file)
    assert out.is_file() and res.size_ratio < 1 / 3.5  # INT8 weights: ~4x smaller than FP32
    ops = _ops(out)
    if target == "x86_64_int8_dynamic":
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
        assert res.calibration_rows == 0
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert res.calibration_rows == 120
    recipe = json.loads(open(res.recipe_path).read())["recipe"]
    assert recipe["target"] == target
    # the quantized model keeps the feature metadata and agrees with FP32 on nearly every row
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["qops.feature_columns"].split(",") == features
    x = pd.read_parquet(data_dir / "validation.parquet")[features].to_numpy(np.float32)
    p32 = ort.InferenceSession(str(fp32_model)).run(None, {"features": x})[0].argmax(1)
    pq = ort.InferenceSession(str(out)).run(None, {"features": x})[0].argmax(1)
    assert (p32 == pq).mean() >= 0.9  # boundary rows of a freshly trained model may flip; most must not


def test_arm64_uses_symmetric_int8_activations(fp32_model, calibration_file, tmp_path):
    out = tmp_path / "arm.onnx"
    quantize(fp32_model, "arm64_int8", out, calibration=calibration_file)
    m = onnx.load(str(out))
    inits = {i.name: i for i in m.graph.initializer}
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zps)  # symmetric: zero point 0


def test_static_target_without_calibration(fp32_model, tmp_path):
    with pytest.raises(DataError, match="needs a calibration set.*--calibration"):
        quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_target(fp32_model, tmp_path):
    with pytest.raises(TargetError, match="Unknown hardware target 'riscv_int2'"):
        quantize(fp32_model, "riscv_int2", tmp_path / "o.onnx")


def test_model_inputs_that_do_not_match_the_data(fp32_model, calibration_file, features, tmp_path):
    with pytest.raises(DataError, match=r"expects 27 features but 3 feature columns"):
        quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "o.onnx", calibration=calibration_file,
                 features=features[:3])
    assert not (tmp_path / "o.onnx").exists() and not list(tmp_path.glob(".*.tmp"))


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_text("not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        quantize(bad, "x86_64_int8_dynamic", tmp_path / "o.onnx")
