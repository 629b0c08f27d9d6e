"""Every technique of the quantization engine, on real small models run by ONNX Runtime."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from qops.errors import DataError, ModelError, TargetError
from qops.quantize import quantize
from qops.quantize.graph import choose_mode, graph_kind
from qops.targets import get_target, list_targets


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": x})[0]


@pytest.fixture(scope="module")
def x_val(data_dir, features):
    return pd.read_parquet(data_dir / "validation.parquet")[features].to_numpy(np.float32)


@pytest.fixture(scope="module")
def ref(fp32_model, x_val):
    return _run(fp32_model, x_val)


def _cos(a, b):
    return float(np.mean(np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))


def _inits(path):
    m = onnx.load(str(path))
    return m, {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_registry_has_a_target_per_hardware_kind():
    t = list_targets()
    expected = {"x86_64_vnni_int8", "x86_64_avx2_int8", "x86_64_int8_dynamic", "arm64_int8", "int4_weight_only",
                "codebook_4bit", "nvidia_fp16", "nvidia_tensorrt_int8", "nvidia_hopper_fp8", "torch_x86_int8",
                "torch_int8_dynamic"}
    assert expected <= set(t)
    assert {n for n, r in t.items() if r.queue == "gpu"} == {"nvidia_fp16", "nvidia_tensorrt_int8", "nvidia_hopper_fp8",
                                                             "llm_gpu_int4", "llm_gpu_fp8"}
    assert t["x86_64_avx2_int8"].reduce_range and not t["x86_64_vnni_int8"].reduce_range
    assert t["nvidia_tensorrt_int8"].symmetric_activations and t["nvidia_tensorrt_int8"].activation_type == "int8"
    assert t["nvidia_hopper_fp8"].min_compute_capability == (8, 9) and t["nvidia_hopper_fp8"].engine == "torchao"
    assert t["int4_weight_only"].precision == "int4" and t["codebook_4bit"].precision == "codebook"
    assert t["torch_x86_int8"].torch_method == "pt2e_x86_inductor"
    for r in t.values():  # every recipe round-trips through JSON (the card and MLflow tags carry it)
        assert type(r).from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("options, message", [
    ({"smooth_quant_alpha": 0.5, "precision": "int4", "mode": "weight_only"}, "SmoothQuant.*weight-only"),
    ({"embedding_granularity": "per-row", "precision": "int4", "mode": "weight_only"}, "per-row embedding"),
    ({"smooth_quant_alpha": 1.5}, r"smooth_quant_alpha 1.5 is outside \(0, 1\)"),
    ({"percentile": 80}, r"percentile 80(\.0)? is outside \[90, 100\)"),
    ({"calibration_methd": "entropy"}, r"unknown recipe option\(s\) \['calibration_methd'\]"),
    ({"mode": "cast"}, "mode 'cast' does not apply to precision 'int8'"),
])
def test_recipe_options_are_validated_with_a_fix(options, message):
    with pytest.raises(TargetError, match=message) as e:
        get_target("x86_64_vnni_int8", options)
    assert e.value.fix


def test_int4_block_size_is_validated():
    with pytest.raises(TargetError, match="block_size 48 is not a power of two"):
        get_target("int4_weight_only", {"block_size": 48})


def _tiny_graph(nodes, inits, n_in=8, n_out=4, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_graph_structure_picks_dynamic_for_attention_and_recurrent_static_otherwise(fp32_model):
    from qops.examples.models import BertConfig, build_bert, export_bert_onnx

    assert graph_kind(onnx.load(str(fp32_model))) == "mlp"
    assert choose_mode("mlp") == "static" and choose_mode("convolutional") == "static"
    assert choose_mode("attention") == "dynamic" and choose_mode("recurrent") == "dynamic"
    conv = _tiny_graph([helper.make_node("Reshape", ["features", "s"], ["r"]),
                        helper.make_node("Conv", ["r", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["y"])],
                       [numpy_helper.from_array(np.array([-1, 1, 8, 1], np.int64), "s"),
                        numpy_helper.from_array(np.ones((4, 1, 8, 1), np.float32), "w")])
    assert graph_kind(conv) == "convolutional"
    lstm = _tiny_graph([helper.make_node("LSTM", ["features", "W", "R"], ["y"], hidden_size=4)], [])
    assert graph_kind(lstm) == "recurrent"
    import tempfile
    from pathlib import Path

    cfg = BertConfig(vocab_size=100, hidden=32, layers=1, heads=2, intermediate=64, seq_len=8)
    with tempfile.TemporaryDirectory() as d:
        bert = export_bert_onnx(build_bert(cfg), cfg, Path(d) / "bert.onnx")
        assert graph_kind(onnx.load(str(bert))) == "attention"


def test_auto_mode_resolves_by_structure_and_is_recorded(fp32_model, calibration_file, tmp_path):
    res = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "q.onnx", calibration=calibration_file)
    assert res.mode == "static" and res.graph_kind == "mlp"
    assert "mode auto -> static (mlp graph)" in res.notes


def test_per_tensor_vs_per_channel_and_symmetric_vs_affine_weights(fp32_model, calibration_file, tmp_path, x_val, ref):
    pc = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "pc.onnx", calibration=calibration_file)
    pt = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "pt.onnx", calibration=calibration_file,
                  options={"per_channel": False})
    aff = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "aff.onnx", calibration=calibration_file,
                   options={"symmetric_weights": False, "weight_type": "uint8", "per_channel": False})

    def weight_qparams(path):
        m, inits = _inits(path)
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
              and "weight" in n.input[0]]
        return [(inits[n.input[1]], inits[n.input[2]] if len(n.input) > 2 else None) for n in dq]

    assert all(s.size > 1 for s, _ in weight_qparams(pc.model_path))  # one scale per output channel
    assert all(s.size == 1 for s, _ in weight_qparams(pt.model_path))
    assert all(not z.any() for _, z in weight_qparams(pc.model_path))  # symmetric: zero point 0
    zps = [z for _, z in weight_qparams(aff.model_path)]
    assert zps and all(z.dtype == np.uint8 for z in zps) and any((z != 0).any() for z in zps)  # affine
    for r in (pc, pt, aff):
        assert _cos(_run(r.model_path, x_val), ref) > 0.99
    assert pc.recipe["granularity"] == "per-channel" and pt.recipe["granularity"] == "per-tensor"


def test_static_calibration_methods_set_different_ranges(fp32_model, calibration_file, tmp_path, x_val, ref):
    scales = {}
    for method in ("minmax", "percentile", "entropy", "distribution"):
        r = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / f"{method}.onnx", calibration=calibration_file,
                     options={"calibration_method": method, "percentile": 99.0})
        m, inits = _inits(r.model_path)
        scales[method] = np.array([float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"])
        assert r.technique["calibration_method"] == method
        assert _cos(_run(r.model_path, x_val), ref) > 0.98, method
    # percentile clipping (99th) narrows activation ranges below min-max
    assert (scales["percentile"] < scales["minmax"]).all()
    assert not np.allclose(scales["distribution"], scales["minmax"])


def test_dynamic_needs_no_calibration_and_reduce_range_keeps_weights_7_bit(fp32_model, calibration_file, tmp_path):
    dyn = quantize(fp32_model, "x86_64_int8_dynamic", tmp_path / "d.onnx")
    assert dyn.calibration_rows == 0 and dyn.mode == "dynamic"
    avx2 = quantize(fp32_model, "x86_64_avx2_int8", tmp_path / "a.onnx", calibration=calibration_file)
    vnni = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "v.onnx", calibration=calibration_file)

    def weights(path):
        return [v for k, v in _inits(path)[1].items() if k.endswith("weight_quantized")]

    assert weights(avx2.model_path) and all(np.abs(a.astype(int)).max() <= 64 for a in weights(avx2.model_path))
    assert max(np.abs(a.astype(int)).max() for a in weights(vnni.model_path)) > 100  # full 8-bit range with VNNI


def test_tensorrt_recipe_is_symmetric_int8_qdq(fp32_model, calibration_file, tmp_path):
    r = quantize(fp32_model, "nvidia_tensorrt_int8", tmp_path / "trt.onnx", calibration=calibration_file)
    m, inits = _inits(r.model_path)
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zps and all(not z.any() for z in zps)  # symmetric everywhere (TensorRT requires zero point 0)
    assert {z.dtype for z in zps} == {np.dtype(np.int8), np.dtype(np.int32)}  # s8 tensors, int32 biases


def test_fp16_halves_the_model_and_keeps_fp32_io(fp32_model, tmp_path, x_val, ref):
    r = quantize(fp32_model, "nvidia_fp16", tmp_path / "h.onnx")
    m, inits = _inits(r.model_path)
    assert {a.dtype for k, a in inits.items() if a.ndim == 2} == {np.dtype(np.float16)}
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert 1.9 < 1 / r.size_ratio < 2.1
    assert _cos(_run(r.model_path, x_val), ref) > 0.9999  # ORT's CPU EP can run it (slowly) for this check


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_int4_weight_only_blockwise(algorithm, fp32_model, calibration_file, tmp_path, x_val, ref):
    r = quantize(fp32_model, "int4_weight_only", tmp_path / f"{algorithm}.onnx", calibration=calibration_file,
                 options={"algorithm": algorithm})
    ops = {n.op_type for n in onnx.load(r.model_path).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops  # the Gemm layers were rewritten as MatMul first
    assert r.technique["gemm_rewritten_as_matmul"] == 4 and r.technique["algorithm"] == algorithm
    assert 1 / r.size_ratio > 6.0  # 27-wide first layer pads to a 128 block; wide models reach > 7x (benchmarks)
    assert _cos(_run(r.model_path, x_val), ref) > 0.97
    if algorithm == "gptq":
        assert r.calibration_rows == 120


def test_gptq_without_calibration_is_refused(fp32_model, tmp_path):
    with pytest.raises(DataError, match="uses GPTQ, which needs a calibration set"):
        quantize(fp32_model, "int4_weight_only", tmp_path / "g.onnx", options={"algorithm": "gptq"})


@pytest.mark.parametrize("kind", ["kmeans", "pow2"])
def test_codebook_weights_save_size_not_time(kind, fp32_model, tmp_path, x_val, ref):
    r = quantize(fp32_model, "codebook_4bit", tmp_path / f"{kind}.onnx", options={"codebook": kind})
    assert 1 / r.size_ratio > 7.0
    assert any("save size, not time" in n for n in r.notes)
    m, inits = _inits(r.model_path)
    books = [v for k, v in inits.items() if k.endswith("_codebook")]
    assert books and all(b.size % 16 == 0 for b in books)
    if kind == "pow2":  # every entry is 0 or +-2^e
        vals = np.concatenate(books)
        nz = np.abs(vals[vals != 0])
        assert np.allclose(np.log2(nz), np.round(np.log2(nz)))
    assert _cos(_run(r.model_path, x_val), ref) > (0.97 if kind == "pow2" else 0.98)  # pow2 is the coarser grid


def test_smoothquant_preserves_the_fp32_function_and_quantizes(fp32_model, calibration_file, features, tmp_path,
                                                               x_val, ref):
    from qops.quantize.readers import TableCalibrationReader
    from qops.quantize.smoothquant import smooth

    m = onnx.load(str(fp32_model))
    reader = TableCalibrationReader(str(calibration_file), str(fp32_model), features, 64)
    report = smooth(m, reader, alpha=0.5)
    assert report["smoothed"] == 4
    onnx.save(m, str(tmp_path / "smoothed.onnx"))
    # the migration is exact in FP32: X diag(1/s) . diag(s) W == X W
    np.testing.assert_allclose(_run(tmp_path / "smoothed.onnx", x_val), ref, rtol=1e-4, atol=1e-4)
    r = quantize(fp32_model, "x86_64_vnni_int8", tmp_path / "sq.onnx", calibration=calibration_file,
                 options={"smooth_quant_alpha": 0.5})
    assert r.technique["smooth_quant"]["smoothed"] == 4
    assert _cos(_run(r.model_path, x_val), ref) > 0.98


def test_outlier_activation_channel_is_tamed_by_smoothquant(tmp_path):
    """Three planted outlier activation channels (x100; the next layer's weights for them are /100, so the output
    still depends on every channel) make the per-tensor activation scale useless for the other 61 channels.
    SmoothQuant moves the outliers into the (per-channel quantized) weights and recovers fidelity."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 64)).astype(np.float32)
    w2 = rng.normal(size=(64, 8)).astype(np.float32) / 8
    scale = np.ones(64, np.float32)
    scale[:3] = 100.0  # three outlier channels
    w2[:3, :] /= 100.0
    m = _tiny_graph([helper.make_node("MatMul", ["features", "w1"], ["h"], name="l1"),
                     helper.make_node("Mul", ["h", "sc"], ["h2"], name="outlier"),
                     helper.make_node("MatMul", ["h2", "w2"], ["y"], name="l2")],
                    [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(scale, "sc"),
                     numpy_helper.from_array(w2, "w2")], n_in=16, n_out=8)
    onnx.save(m, str(tmp_path / "o.onnx"))
    cols = [f"f{i}" for i in range(16)]
    pd.DataFrame(rng.normal(size=(256, 16)).astype(np.float32), columns=cols).to_parquet(tmp_path / "cal.parquet")
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = _run(tmp_path / "o.onnx", x)
    base = {"mode": "static", "per_channel": True, "op_types": ["MatMul"]}
    plain = quantize(tmp_path / "o.onnx", "x86_64_vnni_int8", tmp_path / "p.onnx", calibration=tmp_path / "cal.parquet",
                     features=cols, options=base)
    sq = quantize(tmp_path / "o.onnx", "x86_64_vnni_int8", tmp_path / "s.onnx", calibration=tmp_path / "cal.parquet",
                  features=cols, options={**base, "smooth_quant_alpha": 0.5})

    def sqnr(p):
        out = _run(p, x)
        return 10 * np.log10(np.sum(y**2) / np.sum((out - y) ** 2))

    assert sqnr(plain.model_path) < 10 and sqnr(sq.model_path) > 25  # dB (measured: 3.4 -> 29.2)


def test_unquantizable_ops_are_left_in_fp32_and_reported(tmp_path):
    rng = np.random.default_rng(1)
    m = _tiny_graph([helper.make_node("MatMul", ["features", "w"], ["h"], name="mm"),
                     helper.make_node("Einsum", ["h"], ["y"], equation="bi->bi", name="einsum")],
                    [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")])
    onnx.save(m, str(tmp_path / "e.onnx"))
    r = quantize(tmp_path / "e.onnx", "x86_64_int8_dynamic", tmp_path / "q.onnx", features=[f"f{i}" for i in range(8)])
    assert r.model_report["left_fp32"]["ops_without_quantized_kernels"] == {"Einsum": 1}
    assert any("left in FP32 (no quantized kernel): Einsum x1" in n for n in r.notes)


def test_a_model_with_nothing_to_quantize_is_a_clear_error(tmp_path):
    m = _tiny_graph([helper.make_node("Relu", ["features"], ["y"])], [], n_out=8)
    onnx.save(m, str(tmp_path / "relu.onnx"))
    with pytest.raises(ModelError, match="found nothing to quantize.*no MatMul.* node with constant weights"):
        quantize(tmp_path / "relu.onnx", "int4_weight_only", tmp_path / "q.onnx", features=[f"f{i}" for i in range(8)])
    assert not (tmp_path / "q.onnx").exists()


def test_low_opset_is_upgraded_before_quantizing(tmp_path):
    rng = np.random.default_rng(2)
    m = _tiny_graph([helper.make_node("MatMul", ["features", "w"], ["y"], name="mm")],
                    [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")], opset=9)
    onnx.save(m, str(tmp_path / "old.onnx"))
    r = quantize(tmp_path / "old.onnx", "x86_64_int8_dynamic", tmp_path / "q.onnx", features=[f"f{i}" for i in range(8)])
    assert r.model_report["upgraded_from"] == 9 and r.model_report["opset"] == 17
    assert "model upgraded from opset 9 to 17 before quantizing" in r.notes
    x = rng.normal(size=(5, 8)).astype(np.float32)
    assert _cos(_run(r.model_path, x), _run(tmp_path / "old.onnx", x)) > 0.999


def test_external_data_model_is_quantized_with_external_data(fp32_model, tmp_path, x_val, ref):
    big = tmp_path / "ext" / "big.onnx"
    big.parent.mkdir()
    onnx.save(onnx.load(str(fp32_model)), str(big), save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.onnx.data", size_threshold=1024)
    out = tmp_path / "out" / "q.onnx"
    r = quantize(big, "x86_64_int8_dynamic", out)
    assert r.model_report["external_data"] and (out.parent / "q.onnx.data").is_file()
    assert r.source_size_bytes > 2_000_000 and 1 / r.size_ratio > 3.5  # sizes include the external data files
    assert _cos(_run(out, x_val), ref) > 0.99
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data", "q.onnx.recipe.json"]


def test_gpu_target_on_a_cpu_worker_names_the_install_and_the_queue(fp32_model, data_dir, features, tmp_path):
    import onnxruntime as ort

    from qops.evaluate import evaluate

    r = quantize(fp32_model, "nvidia_fp16", tmp_path / "h.onnx")  # producing the artefact needs no GPU
    if "CUDAExecutionProvider" in ort.get_available_providers():  # a GPU worker set up as the README says
        ev = evaluate(fp32_model, r.model_path, data_dir / "validation.parquet", "risk", target=r.recipe,
                      latency_runs=20)
        assert ev.fidelity["cosine_mean"] > 0.99
    else:
        with pytest.raises(TargetError,
                           match=r"CUDAExecutionProvider.*lacks.*Fix: install onnxruntime-gpu.*'gpu' queue"):
            evaluate(fp32_model, r.model_path, data_dir / "validation.parquet", "risk", target=r.recipe)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present: no error to check")
def test_cuda_torch_target_on_a_cpu_worker_names_the_queue():
    from qops.quantize.torch_engine import require_torch_runtime

    with pytest.raises(TargetError, match="no CUDA device.*Fix: route the task to the 'gpu' queue"):
        require_torch_runtime(get_target("nvidia_hopper_fp8"))


def test_engine_and_file_kind_mismatch_is_explained(fp32_model, tmp_path):
    with pytest.raises(ModelError, match="quantizes PyTorch programs .* not fp32.onnx"):
        quantize(fp32_model, "torch_x86_int8", tmp_path / "t.pt2")
    (tmp_path / "m.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="is a PyTorch program.*pick a torch_\\* target"):
        quantize(tmp_path / "m.pt2", "x86_64_int8_dynamic", tmp_path / "o.onnx")
