"""Decoder LLMs: ONNX export with a KV cache, each CPU algorithm (RTN, GPTQ, HQQ, k-quant, NF4), the evaluation
metrics, QLoRA (resumed after an interruption), GPU targets' errors on CPU, and the whole pipeline registering a
QLoRA-fine-tuned, INT4-quantized model through a real MLflow store. The model is a tiny Llama trained here for a few
steps on the shipped BBC News text: tests check fidelity to its own FP32 outputs, never which tokens it gets right.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qops.errors import QopsError, SpecError

SMALL = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, layers=2, heads=4, kv_heads=2,
             max_positions=256, steps=40, seq_len=64, batch_size=8)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from qops.examples.tiny_llama import TinyLlamaConfig, build, prepare_data
    from qops.llm.source import LlmInfo, export_onnx

    root = tmp_path_factory.mktemp("llm")
    paths = prepare_data(root / "data")
    for name in ("validation", "pool"):  # smaller sets keep the suite fast
        df = pd.read_parquet(paths[name])
        df.groupby("category").head(8).reset_index(drop=True).to_parquet(paths[name])
    # QOPS_TEST_SEED retrains with another seed (scripts/cpu_matrix.sh): the checks are about fidelity, not luck
    build(root / "hf", paths, TinyLlamaConfig(**SMALL, seed=int(os.environ.get("QOPS_TEST_SEED", "0"))), progress=False)
    ex = export_onnx(root / "hf", root / "fp32")
    return {"root": root, "paths": paths, "hf": root / "hf", "export": ex, "info": LlmInfo(**ex["info"])}


def _kind(llm, seq_len=64, stride=32):
    from qops.llm.data import CausalLM

    return CausalLM("text", str(llm["hf"]), seq_len, stride, 2, llm["info"].bos_token_id)


def test_export_has_kv_cache_and_matches_pytorch(llm):
    import onnxruntime as ort

    from qops.llm.runner import OrtDecoder

    ex = llm["export"]
    assert ex["export_check"]["max_abs_logit_difference"] < 1e-3
    assert "onnxruntime-genai" in ex["exporter"]
    names = [i.name for i in ort.InferenceSession(ex["path"]).get_inputs()]
    assert "past_key_values.0.key" in names and f"past_key_values.{llm['info'].num_layers - 1}.value" in names
    folder = llm["root"] / "fp32"
    assert (folder / "genai_config.json").is_file() and (folder / "tokenizer.json").is_file()
    # the KV cache is used correctly: decoding token by token gives the logits of one prefill of the whole sequence
    ids = np.array([0, 17, 99, 5, 300, 42, 7, 8], np.int64)
    dec = OrtDecoder(ex["path"], llm["info"])
    full = dec.prefill(ids)
    dec.prefill(ids[:3])
    stepped = [dec.step(int(t)) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(stepped), full[3:], atol=1e-4)


def test_export_refuses_pickled_or_non_causal_folders(tmp_path, llm):
    from qops.llm.source import check_hf_dir

    d = tmp_path / "m"
    shutil.copytree(llm["hf"], d)
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(QopsError, match="no .safetensors"):
        check_hf_dir(d)
    cfg = json.loads((llm["hf"] / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    shutil.copytree(llm["hf"], tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QopsError, match="not a causal LM"):
        check_hf_dir(tmp_path / "b")


def _agreement_and_ppl(llm, path, windows):
    from qops.llm.evaluate import score_windows
    from qops.llm.runner import OrtDecoder

    s = score_windows(OrtDecoder(llm["export"]["path"], llm["info"]), OrtDecoder(path, llm["info"]), windows,
                      max(w.row for w in windows) + 1)
    n = s["tokens"].sum()
    return s["agree"].sum() / n, float(np.exp((s["nllq"].sum() - s["nll32"].sum()) / n))


@pytest.mark.parametrize("granularity", ["per-block", "per-tensor"])
def test_w8a8_smoothquant_decoder_moves_outliers_into_the_weights(llm, tmp_path, granularity):
    """llm_w8a8_sq: SmoothQuant (a Mul after each smoothed activation) then INT8 MatMuls, lm_head included —
    activations per token and block (8-bit MatMulNBits, the default) or per tensor (dynamic MatMulInteger); the
    model stays faithful to FP32."""
    import onnx

    from qops.llm.data import WindowReader
    from qops.llm.quantize import quantize_onnx_llm
    from qops.targets import get_target

    kind = _kind(llm)
    reader = WindowReader(kind.windows(pd.read_parquet(llm["paths"]["pool"]), "pool", 1), llm["info"])
    out = tmp_path / "w8" / "model.onnx"
    tech = quantize_onnx_llm(llm["export"]["path"], get_target("llm_w8a8_sq", {"activation_granularity": granularity}),
                             out, reader)
    m = onnx.load(str(out))
    smooth = [n for n in m.graph.node if n.op_type == "Mul" and n.name.endswith("_smooth_inv_mul")]
    # per layer: after input_layernorm, attention, post_attention_layernorm, the SwiGLU product; and the final norm
    assert tech["smoothquant"]["smoothed"] == len(smooth) == 4 * llm["info"].num_layers + 1
    op = "MatMulNBits" if granularity == "per-block" else "MatMulInteger"
    assert tech["ops"][op] == 5 * llm["info"].num_layers + 1 and "MatMul" not in tech["ops"]
    windows = kind.windows(pd.read_parquet(llm["paths"]["validation"]), "validation", 1)
    agree, ppl_ratio = _agreement_and_ppl(llm, out, windows)
    assert agree > 0.8 and 0.9 < ppl_ratio < 1.1


@pytest.mark.parametrize("target", ["llm_int4_rtn", "llm_int4_gptq", "llm_int4_awq", "llm_int4_hqq", "llm_int4_kquant",
                                    "llm_nf4"])
def test_each_cpu_algorithm_quantizes_the_decoder(llm, target, tmp_path):
    import onnx

    from qops.llm.data import WindowReader
    from qops.llm.quantize import LM_HEAD, quantize_onnx_llm
    from qops.targets import get_target

    recipe = get_target(target)
    kind = _kind(llm)
    reader = None
    if recipe.needs_calibration:
        windows = kind.windows(pd.read_parquet(llm["paths"]["pool"]), "pool", 1)
        reader = WindowReader(windows, llm["info"])
        assert "past_key_values.0.key" in reader.get_next()  # GPTQ's and AWQ's feeds carry the KV-cache inputs
    out = tmp_path / "q" / "model.onnx"
    tech = quantize_onnx_llm(llm["export"]["path"], recipe, out, reader)
    m = onnx.load(str(out))
    ops = {n.name: n for n in m.graph.node}
    body_op = "MatMulBnb4" if recipe.precision == "nf4" else "MatMulNBits"
    # per layer: qkv (fused), o, gate, up, down; lm_head is an 8-bit MatMulNBits
    assert tech["ops"].get(body_op) == 5 * llm["info"].num_layers + (body_op == "MatMulNBits")
    head = next(n for name, n in ops.items() if name.startswith(LM_HEAD))
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 8  # lm_head 8-bit
    if recipe.precision == "int4":
        assert tech["ops"].get("GatherBlockQuantized") == 1  # embeddings 8-bit (sharing a tied lm_head table)
    if recipe.algorithm == "awq":  # per layer: the inputs of qkv, o, gate/up and down; never worse than RTN
        awq = tech["awq"]
        assert awq["activations"] == 4 * llm["info"].num_layers
        assert awq["mean_relative_error"] <= awq["mean_relative_error_rtn"]
    assert (out.parent / "genai_config.json").is_file()
    fp32_size = llm["root"].joinpath("fp32", "model.onnx").stat().st_size
    assert out.stat().st_size < 0.5 * fp32_size
    windows = kind.windows(pd.read_parquet(llm["paths"]["validation"]), "validation", 1)
    agree, ppl_ratio = _agreement_and_ppl(llm, out, windows)
    assert agree > 0.6 and 0.8 < ppl_ratio < 1.25  # a faithful 4-bit copy of its FP32 model


def test_odd_block_counts_are_refused_with_the_fix(llm, tmp_path):
    from qops.llm.quantize import quantize_onnx_llm
    from qops.targets import get_target

    recipe = get_target("llm_int4_kquant", {"block_size": 128})  # down_proj: 384 rows = 3 blocks of 128
    with pytest.raises(QopsError, match="odd number of 128-blocks.*block_size"):
        quantize_onnx_llm(llm["export"]["path"], recipe, tmp_path / "m.onnx")


def test_evaluation_metrics_are_exact_on_a_tiny_model(llm, tmp_path):
    """FP32 against itself: no change; FP32 perplexity equals the one PyTorch computes on the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    from qops.llm.evaluate import evaluate_llm

    kind = _kind(llm)
    copy = tmp_path / "same.onnx"
    shutil.copy(llm["export"]["path"], copy)
    ev = evaluate_llm(llm["export"]["path"], copy, llm["paths"]["validation"], kind, llm["info"],
                      slice_columns=["category"], bootstrap=100, new_tokens=4, speed_prompts=2, speed_rounds=1)
    o = ev.overall
    assert o["perplexity_increase"]["quantized"] == pytest.approx(0, abs=1e-6)
    assert o["agreement"]["quantized"] == 1.0 and o["kl_divergence"]["quantized"] == pytest.approx(0, abs=1e-6)
    assert {s["key"] for s in ev.slices} == {f"category={c}" for c in pd.read_parquet(
        llm["paths"]["validation"])["category"].unique()}
    # independent perplexity: the HF model's loss on the same scored tokens
    model = AutoModelForCausalLM.from_pretrained(str(llm["hf"]), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for w in kind.windows(pd.read_parquet(llm["paths"]["validation"]), "validation"):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(w.ids[None])).logits[0], -1).numpy()
        pos = np.arange(w.first_scored, len(w.ids))
        nll -= logp[pos - 1, w.ids[pos]].sum()
        n += len(pos)
    assert o["perplexity"]["fp32"] == pytest.approx(np.exp(nll / n), rel=1e-4)
    perf = ev.performance
    assert perf["ttft_ms"]["fp32"] > 0 and perf["decode_tokens_per_s"]["quantized"] > 0
    assert perf["peak_memory_bytes"]["fp32"] and perf["peak_memory_bytes"]["fp32"] > 0
    assert perf["size_bytes"]["fp32"] == perf["size_bytes"]["quantized"]


def test_llm_gates_read_perplexity_and_kl_as_lower_is_better():
    """A quantized model whose perplexity rose 20% fails a 5% tolerance; one that rose 1% passes."""
    from qops.gates import gate
    from qops.spec import GateSpec

    def ev(increase, se=0.002):
        e = {"fp32": 0.0, "quantized": increase, "delta": increase, "ci_low": increase - 2 * se,
             "ci_high": increase + 2 * se, "se": se, "quantized_se": se}
        return {"overall": {"perplexity_increase": e, "agreement": {"fp32": 1, "quantized": 0.95, "delta": -0.05,
                                                                    "quantized_se": 0.005},
                            "kl_divergence": {"fp32": 0, "quantized": 0.01, "delta": 0.01, "quantized_se": 0.001}},
                "slices": [], "fairness": {}, "rows": 100, "flips": None,
                "performance": {"latency_ratio": 0.7, "size_ratio": 0.2, "latency_p50_ms": {"fp32": 1, "quantized": 0.7},
                                "size_bytes": {"fp32": 10, "quantized": 2}}}

    g = GateSpec(task="causal_lm", max_overall_drop=0.05,
                 thresholds=[{"metric": "kl_divergence", "max_value": 0.05}, {"metric": "agreement", "min_value": 0.9}])
    bad = gate(ev(0.20), g)
    assert not bad.passed and "drop[perplexity_increase]" in bad.failed
    assert gate(ev(0.01), g).passed


def test_gpu_targets_fail_clearly_on_a_cpu_worker(llm, tmp_path):
    import torch

    from qops.llm.quantize import quantize_torch_llm
    from qops.targets import get_target

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.sh runs the GPU targets")
    for name in ("llm_gpu_int4", "llm_gpu_fp8"):
        recipe = get_target(name)
        assert recipe.queue == "gpu"
        with pytest.raises(QopsError, match="no CUDA device.*'gpu' queue"):
            quantize_torch_llm(llm["hf"], recipe, tmp_path / name)
        assert not (tmp_path / name).exists()


def _spec(llm, tmp_path, **over):
    from qops.spec import parse_spec

    raw = {"name": "tiny", "source_model": str(llm["hf"]),
           "data": {"kind": "causal_lm", "causal_lm": {"seq_len": 64, "stride": 32, "new_tokens": 4,
                                                       "speed_prompts": 2},
                    "pool": llm["paths"]["pool"], "reference": llm["paths"]["train"],
                    "validation": llm["paths"]["validation"], "label": None, "slice_columns": ["category"]},
           "calibration": {"size": 16, "stratify_by": ["category"], "reference_sample": 400},
           "targets": ["llm_int4_rtn"], "artifact_root": str(tmp_path / "art"),
           # speed is a benchmark question (docs/benchmarks.md); this test checks the plumbing
           "gates": {"max_overall_drop": 0.25, "max_slice_drop": 0.5, "max_latency_ratio": 5.0, "bootstrap": 200,
                     "thresholds": [{"metric": "agreement", "min_value": 0.5}]}}
    for k, v in over.items():
        raw[k] = v
    return parse_spec(raw, tmp_path)


def test_spec_keeps_llm_and_other_targets_apart(llm, tmp_path):
    with pytest.raises(SpecError, match="decoder LLM targets"):
        _spec(llm, tmp_path, targets=["x86_64_vnni_int8"])
    with pytest.raises(SpecError, match="stride"):
        _spec(llm, tmp_path, data={**_spec(llm, tmp_path).data.model_dump(),
                                   "causal_lm": {"seq_len": 32, "stride": 64}})
    spec = _spec(llm, tmp_path)
    assert spec.gates.task == "causal_lm" and spec.gates.metric == "perplexity_increase"
    from qops.spec import parse_spec

    with pytest.raises(SpecError, match="data.kind is tabular"):
        parse_spec({"name": "x", "source_model": "m.onnx", "targets": ["llm_int4_rtn"],
                    "data": {"pool": "p.csv", "reference": "r.csv", "validation": "v.csv", "label": "y"}}, tmp_path)
    for target in ("gguf_q4_k_m", "ct_w4a16_gptq"):  # the new formats are decoder-LLM targets too
        with pytest.raises(SpecError, match="data.kind is tabular"):
            parse_spec({"name": "x", "source_model": "m.onnx", "targets": [target],
                        "data": {"pool": "p.csv", "reference": "r.csv", "validation": "v.csv", "label": "y"}},
                       tmp_path)


@pytest.mark.parametrize("options, message", [
    ({"llm_int4_rtn": {"kv_cache_type": "q8_0"}}, "kv_cache_type is an option of llama.cpp targets"),
    ({"llm_int4_rtn": {"gguf_type": "Q4_K_M"}}, "gguf_type is an option of llama.cpp targets"),
    ({"gguf_q4_k_m": {"gguf_type": "Q2_K"}}, "gguf_type='Q2_K' is not one of"),
    ({"gguf_q4_k_m": {"kv_cache_type": "q4_0"}}, "kv_cache_type='q4_0' is not one of"),
    ({"ct_fp8_dynamic": {"algorithm": "gptq"}}, "FP8 dynamic rounds weights"),
    ({"ct_w4a16_gptq": {"algorithm": "hqq"}}, "algorithm='hqq' is not one of 'rtn', 'gptq', 'awq'"),
    ({"ct_w8a8_int8": {"mode": "weight_only"}}, "compressed-tensors engine writes decoder LLMs as W4A16"),
    ({"ct_w8a8_int8": {"activation_fallback": 1.0}}, "is not a share of the activation cost"),
    ({"ct_w4a16_gptq": {"activation_fallback": 0.3}}, "activation_fallback applies to W8A8 INT8"),
])
def test_unsupported_format_combinations_are_spec_errors(llm, tmp_path, options, message):
    """Each unsupported combination of a serving format's options fails when the spec is read (exit 2), naming the
    fix."""
    target = next(iter(options))
    with pytest.raises(QopsError, match=message) as e:
        _spec(llm, tmp_path, targets=[target], target_options=options)
    assert "Fix:" in str(e.value)  # a QopsError other than GateFailed: the CLI exits 2


def test_qlora_trains_resumes_and_merges(llm, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import qops.llm.qlora as ql

    cfg = ql.QloraSpec(steps=6, checkpoint_every=3, batch_size=2, seq_len=32, r=4, max_rows=40)
    real = ql._batch

    def interrupted(stream, step, c):
        if step == 4:
            raise KeyboardInterrupt("worker killed")
        return real(stream, step, c)

    monkeypatch.setattr(ql, "_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ql.run_qlora(llm["hf"], llm["paths"]["train"], "text", tmp_path / "q", cfg)
    assert json.loads((tmp_path / "q" / "checkpoint" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(ql, "_batch", real)
    res = ql.run_qlora(llm["hf"], llm["paths"]["train"], "text", tmp_path / "q", cfg)
    assert res["resumed_from"] == 3 and res["steps"] == 6 and res["nf4"]["double_quant"]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    base, merged = (load_file(str(p / "model.safetensors")) for p in (llm["hf"], tmp_path / "q" / "merged"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged[key])  # the adapters were merged into the projections
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    assert merged[key].dtype == torch.float32  # a full-precision copy, not the NF4 weights
    assert (tmp_path / "q" / "merged" / "tokenizer.json").is_file()


def test_pipeline_finetunes_quantizes_gates_cards_and_registers(llm, tmp_path, mlflow_uri):
    """QLoRA -> export -> calibrate -> INT4 -> evaluate -> gate -> card -> MLflow, through `qops run`'s stages."""
    import mlflow
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline
    from qops.registry import log_transformers_model, serving_requirements

    with mlflow.start_run():  # the retraining job's side: a transformers-flavored model with alias champion
        logged = log_transformers_model(llm["hf"], serving_requirements(True), registered_model_name="tiny-src")
    MlflowClient().set_registered_model_alias("tiny-src", "champion", logged.registered_model_version)
    spec = _spec(llm, tmp_path, qlora={"steps": 4, "batch_size": 2, "seq_len": 32, "r": 4, "max_rows": 40},
                 mlflow={"experiment": "llm-test"}, source_model="models:/tiny-src@champion")
    summary = run_pipeline(spec, run_id="r1", progress=False)
    row = summary["targets"][0]
    assert row["gate"] == "passed", row
    run = tmp_path / "art" / "tiny" / "r1"
    source = json.loads((run / "source.json").read_text())
    assert source["flavor"] == "transformers" and source["version"] == "1"
    assert source["finetune"]["steps"] == 4 and source["hf_dir"].endswith("merged")
    ev = json.loads((run / "targets" / "llm_int4_rtn" / "evaluation.json").read_text())
    assert ev["task"] == "causal_lm" and ev["primary_metric"] == "perplexity_increase"
    card = (run / "targets" / "llm_int4_rtn" / "card" / "card.md").read_text()
    assert "perplexity_increase" in card and "llm_int4_rtn" in card
    reg = row["mlflow"]
    assert reg["registered"] and "champion" in reg["aliases"]
    client = MlflowClient()
    mv = client.get_model_version(reg["name"], reg["version"])
    assert mv.tags["qops.precision"] == "int4" and mv.tags["qops.gate"] == "passed"
    files = {f.path for f in client.list_artifacts(mv.run_id, "files")}
    assert "files/genai_config.json" in files and "files/tokenizer.json" in files
    assert mv.tags["qops.serves"] == "passed"  # ONNX Runtime GenAI loaded the registered files and generated
    assert "| Serves (registered version loaded by onnxruntime-genai" in card_md_of(run, "llm_int4_rtn")


def test_outlier_channels_keep_the_function_and_give_real_llm_statistics(llm):
    """The benchmark's outlier model: a few hidden channels scaled up after every RMSNorm and the consuming
    projections' input columns scaled down keep the logits (to float rounding) while the projections' inputs get
    channels far above the rest, as in real LLM checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    from qops.examples.outliers import activation_stats, add_outlier_channels

    model = AutoModelForCausalLM.from_pretrained(str(llm["hf"]), dtype=torch.float32, local_files_only=True).eval()
    ids = np.random.default_rng(0).integers(1, llm["info"].vocab_size, size=(2, 48))
    with torch.inference_mode():
        before = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    plain = activation_stats(model, ids)
    done = add_outlier_channels(model, channels=3, scale=80.0, seed=1)
    assert len(done["channels"]) == 3 and done["sites"] == 2 * len(model.model.layers)
    with torch.inference_mode():
        after = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    outliers = activation_stats(model, ids)
    assert set(outliers) == set(plain) and len(plain) == 2 * len(model.model.layers)
    for site, s in plain.items():  # every site: its largest channel now towers over the median channel
        assert outliers[site]["max_over_median"] > max(20.0, 2 * s["max_over_median"]), (site, s, outliers[site])
    with pytest.raises(ValueError, match="channels must be"):
        add_outlier_channels(model, channels=0)


@pytest.mark.parametrize("target", ["hf_bnb_nf4", "hf_bnb_int8"])
def test_bitsandbytes_targets_write_folders_transformers_reloads(llm, target, tmp_path):
    """The guide's workflow as a target: the checkpoint loaded with BitsAndBytesConfig (NF4 + double quantization;
    LLM.int8()), saved as a Transformers folder whose quantization_config reloads it as a quantized model, and
    evaluated by loading that folder back (perplexity, agreement, KL against the FP32 checkpoint; decode speed)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from qops.llm.bnb import quantize_bnb_llm
    from qops.llm.evaluate import artifact_size, evaluate_llm
    from qops.targets import get_target

    recipe = get_target(target)
    out = tmp_path / "model"
    tech = quantize_bnb_llm(llm["hf"], recipe, out)
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "bitsandbytes" and tech["bitsandbytes"] == bnb.__version__
    if target == "hf_bnb_nf4":
        assert conf["load_in_4bit"] and conf["bnb_4bit_quant_type"] == "nf4" and conf["bnb_4bit_use_double_quant"]
    else:
        assert conf["load_in_8bit"]
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", local_files_only=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if target == "hf_bnb_nf4" else bnb.nn.Linear8bitLt)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert artifact_size(out) < 0.7 * artifact_size(llm["hf"])
    ev = evaluate_llm(str(llm["hf"]), str(out), llm["paths"]["validation"], _kind(llm), llm["info"],
                      bootstrap=50, new_tokens=4, speed_prompts=2, speed_rounds=1, target=recipe.to_dict(),
                      measure_memory=False)
    o = ev.overall
    assert o["agreement"]["quantized"] > 0.6 and abs(o["perplexity_increase"]["quantized"]) < 0.25
    assert ev.performance["decode_tokens_per_s"]["quantized"] > 0


def test_bitsandbytes_target_runs_the_pipeline_and_loads_back_from_the_registry(llm, tmp_path, mlflow_uri):
    """hf_bnb_nf4 through `qops run`'s stages: a Transformers folder gated against the FP32 checkpoint, carded,
    registered with the transformers flavor (bitsandbytes in its requirements), and
    `mlflow.transformers.load_model("models:/...@champion")` returns the 4-bit model."""
    import bitsandbytes as bnb
    import mlflow
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline

    spec = _spec(llm, tmp_path, targets=["hf_bnb_nf4"], mlflow={"experiment": "llm-bnb"},
                 gates={"max_overall_drop": 0.25, "max_slice_drop": 0.5, "max_latency_ratio": 100.0,
                        "bootstrap": 100, "thresholds": [{"metric": "agreement", "min_value": 0.5}]})
    row = run_pipeline(spec, run_id="b1", progress=False)["targets"][0]
    assert row["gate"] == "passed" and row["mlflow"]["registered"] and "champion" in row["mlflow"]["aliases"], row
    q = json.loads((tmp_path / "art" / "tiny" / "b1" / "targets" / "hf_bnb_nf4" / "quantize.json").read_text())
    assert q["engine"] == "bitsandbytes" and q["size_ratio"] < 0.7 and q["technique"]["algorithm"].startswith(
        "bitsandbytes NF4")
    name = row["mlflow"]["name"]
    mv = MlflowClient().get_model_version(name, row["mlflow"]["version"])
    assert mv.tags["qops.precision"] == "nf4" and mv.tags["qops.serves"] == "passed"
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion")
    assert "bitsandbytes==" in Path(reqs).read_text()
    loaded = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")
    assert isinstance(loaded["model"].model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    # the registered weights are the evaluated folder's, byte for byte (a re-save of NF4 is not exact)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    folder = Path(q["model_path"])
    assert (local / "model" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def card_md_of(run, target):
    return (run / "targets" / target / "card" / "card.md").read_text()


def test_a_registered_llm_its_runtime_cannot_serve_gets_no_alias(llm, tmp_path, mlflow_uri):
    """Serve before promote: the second run's GenAI config is corrupted after its gates passed; ONNX Runtime GenAI
    cannot load the registered version in a fresh process, so it keeps no alias (champion stays on the first run's
    version), is tagged qops.serves=failed, and its card says so."""
    from mlflow import MlflowClient

    from qops.artifacts import sha256_file
    from qops.pipeline import STAGES, run_pipeline
    from qops.run_folder import RunLayout

    spec = _spec(llm, tmp_path, mlflow={"experiment": "llm-serves"})
    first = run_pipeline(spec, run_id="s1", progress=False)["targets"][0]["mlflow"]
    assert first["registered"] and "champion" in first["aliases"]
    for st in STAGES:  # the second run, stage by stage, up to the register stage
        if st.name == "register":
            break
        if st.applies(spec, "llm_int4_rtn"):
            st.fn(spec, "s2", "llm_int4_rtn") if st.per_target else st.fn(spec, "s2")
    run = tmp_path / "art" / "tiny" / "s2"
    bad = run / "targets" / "llm_int4_rtn" / "model" / "genai_config.json"
    bad.write_text('{"model": {"type": "nonsense"}}')
    # as if the quantizer itself had written it (the integrity check refuses files changed after quantize)
    qfile = run / "targets" / "llm_int4_rtn" / RunLayout.QUANTIZE
    q = json.loads(qfile.read_text())
    q["manifest"]["genai_config.json"] = sha256_file(bad)
    qfile.write_text(json.dumps(q))
    reg = next(st for st in STAGES if st.name == "register").fn(spec, "s2", "llm_int4_rtn")
    assert reg["registered"] and reg["aliases"] == [] and not reg["serves"]["passed"] and reg["serves"]["error"]
    client = MlflowClient()
    assert client.get_model_version(reg["name"], reg["version"]).tags["qops.serves"] == "failed"
    assert str(client.get_model_version_by_alias(reg["name"], "champion").version) == first["version"]
    assert "**FAILED**" in card_md_of(run, "llm_int4_rtn") and "aliases not moved" in card_md_of(run, "llm_int4_rtn")



def test_gguf_conversion_keeps_the_function_and_the_tokenizer(llm, tmp_path):
    """llama.cpp's converter (with the byte-level BPE tokenizer named gpt-2) writes an FP32 GGUF whose logits are
    the ONNX export's to 1e-3 and whose tokenizer splits text as the checkpoint's does; llama.cpp's quantizer then
    writes each type with the importance matrix of the calibration windows."""
    from transformers import AutoTokenizer

    from qops.llm.gguf import convert_hf, importance_matrix, quantize_gguf, tensor_types
    from qops.llm.llamacpp import LlamaCppDecoder, open_llama
    from qops.llm.runner import OrtDecoder

    f32 = tmp_path / "model-f32.gguf"
    convert_hf(llm["hf"], f32)
    tok = AutoTokenizer.from_pretrained(str(llm["hf"]))
    texts = pd.read_parquet(llm["paths"]["validation"])["text"].tolist()[:6]
    lc = open_llama(f32, n_ctx=256, logits_all=False)
    for t in texts:
        assert lc.tokenize(t[:400].encode(), add_bos=False) == tok(t[:400])["input_ids"]
    ids = [llm["info"].bos_token_id] + tok(texts[0])["input_ids"][:60]
    ref = OrtDecoder(llm["export"]["path"], llm["info"]).prefill(ids)
    got = LlamaCppDecoder(f32, llm["info"]).prefill(ids)
    assert np.abs(ref - got).max() < 1e-3
    windows = _kind(llm).windows(pd.read_parquet(llm["paths"]["pool"]).head(6), "pool")
    im = importance_matrix(llm["hf"], windows, llm["info"].num_layers)
    assert im["entries"] == 7 * llm["info"].num_layers + 1 and im["tokens"] == sum(len(w.ids) for w in windows)
    assert all(v.min() > 0 and np.isfinite(v).all() for v in im["values"].values())
    q = tmp_path / "q4_0.gguf"
    quantize_gguf(f32, q, "Q4_0", im["values"])
    assert tensor_types(q).get("q4_0", 0) >= 7 * llm["info"].num_layers and q.stat().st_size < f32.stat().st_size / 4
    agree = (LlamaCppDecoder(q, llm["info"]).prefill(ids).argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.6
    bad = tmp_path / "truncated.gguf"  # a damaged file: llama.cpp refuses it, and the error says so
    bad.write_bytes(q.read_bytes()[: q.stat().st_size // 2])
    with pytest.raises(ValueError, match="Failed to load model"):
        open_llama(bad, n_ctx=64, logits_all=False)


def test_gguf_targets_run_the_pipeline_serve_in_llama_cpp_and_load_from_the_registry(llm, tmp_path, mlflow_uri):
    """gguf_q4_k_m (KV cache q8_0) and gguf_q8_0 through the pipeline: evaluated by llama.cpp against the FP32
    PyTorch checkpoint (no ONNX target, so no ONNX export), carded, registered as a pyfunc whose code loads the GGUF with llama.cpp, served in a fresh process
    before the aliases move; `mlflow.pyfunc.load_model("models:/...@champion").predict` generates."""
    import mlflow
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline

    spec = _spec(llm, tmp_path, targets=["gguf_q4_k_m", "gguf_q8_0"], mlflow={"experiment": "llm-gguf"},
                 target_options={"gguf_q4_k_m": {"kv_cache_type": "q8_0"}},
                 gates={"max_overall_drop": 0.25, "max_slice_drop": 0.5, "max_latency_ratio": 100.0,
                        "bootstrap": 100, "thresholds": [{"metric": "agreement", "min_value": 0.5}]})
    rows = {r["target"]: r for r in run_pipeline(spec, run_id="g1", progress=False)["targets"]}
    run = tmp_path / "art" / "tiny" / "g1"
    for target, row in rows.items():
        assert row["gate"] == "passed" and row["mlflow"]["registered"] and "champion" in row["mlflow"]["aliases"], row
        q = json.loads((run / "targets" / target / "quantize.json").read_text())
        ev = json.loads((run / "targets" / target / "evaluation.json").read_text())
        # no ONNX target in this spec: no ONNX export, and the FP32 reference is the PyTorch checkpoint itself
        assert q["engine"] == "llama.cpp" and q["model_path"].endswith(".gguf") and q["source_path"] == str(llm["hf"])
        assert not (run / "fp32").exists()
        assert ev["performance"]["latency_method"].count("llama.cpp") == 1
        assert ev["performance"]["peak_memory_bytes"]["quantized"] > 0
        mv = MlflowClient().get_model_version(row["mlflow"]["name"], row["mlflow"]["version"])
        reg = json.loads((run / "targets" / target / "register.json").read_text())
        assert mv.tags["qops.serves"] == "passed" and reg["serves"]["runtime"].startswith("llama.cpp")
        assert "llama-server -m model.gguf" in card_md_of(run, target) and "GGUF " in card_md_of(run, target)
    q4 = json.loads((run / "targets" / "gguf_q4_k_m" / "quantize.json").read_text())
    assert q4["technique"]["imatrix"]["windows"] > 0 and q4["technique"]["kv_cache_type"] == "q8_0"
    reg = json.loads((run / "targets" / "gguf_q4_k_m" / "register.json").read_text())
    assert reg["serves"]["runtime"] == "llama.cpp (KV cache q8_0)"
    name = rows["gguf_q4_k_m"]["mlflow"]["name"]
    assert "llama-cpp-python==" in Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion")).read_text()
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"prompt": ["The government said on Monday that"]}), params={"max_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str) and out[0]


@pytest.mark.parametrize("target", ["ct_w4a16_gptq", "ct_w4a16_awq", "ct_w8a8_int8", "ct_fp8_dynamic"])
def test_compressed_tensors_targets_write_what_transformers_reloads(llm, target, tmp_path):
    """Each compressed-tensors target writes its scheme's layout (packed int4 / int8 / e4m3 weights with scales) and a
    quantization_config Transformers reloads; the reloaded layers' weights sit on the scheme's grid, and the model
    keeps agreeing with FP32."""
    import torch
    from safetensors import safe_open

    from qops.llm.ct import quantize_ct_llm
    from qops.llm.torch_target import load_torch_target
    from qops.targets import get_target

    recipe = get_target(target)
    windows = _kind(llm).windows(pd.read_parquet(llm["paths"]["pool"]).head(12), "pool") \
        if recipe.needs_calibration else None
    tech = quantize_ct_llm(llm["hf"], recipe, tmp_path / "ct", windows)
    conf = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    kept = tech.get("kept_unquantized", [])
    assert conf["quant_method"] == "compressed-tensors" and sorted(conf["ignore"]) == sorted(["lm_head", *kept])
    assert bool(kept) == (recipe.precision == "int8")  # W8A8: the costliest activation site stays unquantized
    group = conf["config_groups"]["group_0"]
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = "model.layers.0.mlp.down_proj"
        if recipe.precision == "int4":
            assert conf["format"] == "pack-quantized" and group["weights"]["group_size"] == 128
            assert f.get_tensor(f"{q}.weight_packed").dtype == torch.int32 and f"{q}.weight" not in keys
        elif recipe.precision == "int8":
            assert conf["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
            assert tech["smoothquant"]["linear_sites"] and tech["activation_fallback"]["kept"]
            for name in kept:  # left out of the scheme: the module's float weight, no scale
                assert f.get_tensor(f"{name}.weight").dtype == torch.float32 and f"{name}.weight_scale" not in keys
            q = next(f"model.layers.{i}.mlp.down_proj" for i in range(4) if f"model.layers.{i}.mlp.down_proj" not in kept)
            assert f.get_tensor(f"{q}.weight").dtype == torch.int8
        else:
            assert conf["format"] == "float-quantized" and f.get_tensor(f"{q}.weight").dtype == torch.float8_e4m3fn
        assert f"{q}.weight_scale" in keys and "lm_head.weight" in keys
    dec = load_torch_target(tmp_path / "ct", recipe.to_dict())
    assert "compressed-tensors" in dec.describe
    ids = [llm["info"].bos_token_id] + list(range(10, 70))
    ref = load_torch_target(llm["hf"], None).prefill(ids)
    got = dec.prefill(ids)
    assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.8
    if recipe.precision == "int4":  # dequantized weights: at most 16 levels per group of 128
        w = dec.model.model.layers[0].mlp.down_proj.weight.detach().float()
        assert len(torch.unique(w[0, :128])) <= 16


def test_torch_gptq_and_awq_beat_round_to_nearest_on_the_layer_outputs(llm):
    """qops' PyTorch GPTQ lowers each layer's output error on its calibration inputs below round-to-nearest's, and
    SmoothQuant and AWQ's folds leave the FP32 function unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from qops.llm.torch_quant import awq, fake_quant, gptq_weight, qparams, smoothquant

    model = AutoModelForCausalLM.from_pretrained(str(llm["hf"]), dtype=torch.float32).eval()
    windows = _kind(llm).windows(pd.read_parquet(llm["paths"]["pool"]).head(12), "pool")
    ids = torch.as_tensor(windows[0].ids)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    xs = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, 384)))
    with torch.no_grad():
        for w in windows:
            model(input_ids=torch.as_tensor(w.ids)[None])
    h.remove()
    x = torch.cat(xs).double()
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    wq, _ = gptq_weight(w, (2 * x.T @ x / len(x)).float(), 4, 128)
    scale, qmin, qmax = qparams(w, 4, 128)
    rtn = fake_quant(w, scale, qmin, qmax, 128)
    err = lambda q: float(((x.float() @ (q - w).T) ** 2).mean())  # noqa: E731
    assert err(wq) < 0.9 * err(rtn)
    smoothquant(model, windows, 0.5)
    awq(model, windows, 4, 128)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


def test_compressed_tensors_target_runs_the_pipeline_and_loads_back_from_the_registry(llm, tmp_path, mlflow_uri):
    """ct_w8a8_int8 through the pipeline: calibrated on the drift-checked set, evaluated through Transformers,
    registered with the transformers flavor (its weights byte for byte, compressed-tensors in the requirements, the
    format and version in a tag), served in a fresh process; `mlflow.transformers.load_model` returns it."""
    import mlflow
    from mlflow import MlflowClient

    from qops.pipeline import run_pipeline

    spec = _spec(llm, tmp_path, targets=["ct_w8a8_int8"], mlflow={"experiment": "llm-ct"},
                 gates={"max_overall_drop": 0.25, "max_slice_drop": 0.5, "max_latency_ratio": 100.0,
                        "bootstrap": 100, "thresholds": [{"metric": "agreement", "min_value": 0.5}]})
    row = run_pipeline(spec, run_id="c1", progress=False)["targets"][0]
    assert row["gate"] == "passed" and "champion" in row["mlflow"]["aliases"], row
    run = tmp_path / "art" / "tiny" / "c1"
    q = json.loads((run / "targets" / "ct_w8a8_int8" / "quantize.json").read_text())
    assert q["calibration_rows"] > 0 and q["technique"]["calibration_windows"] > 0
    reg = json.loads((run / "targets" / "ct_w8a8_int8" / "register.json").read_text())
    assert reg["serves"]["passed"] and reg["serves"]["runtime"] == "transformers+compressed-tensors"
    name = row["mlflow"]["name"]
    mv = MlflowClient().get_model_version(name, row["mlflow"]["version"])
    assert mv.tags["qops.format"].startswith("compressed-tensors 0.") and "int-quantized" in mv.tags["qops.format"]
    assert "compressed-tensors==" in Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion")).read_text()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    folder = Path(q["model_path"])
    assert (local / "model" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    loaded = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")
    assert loaded["model"].config.quantization_config.quant_method == "compressed-tensors"
    assert "vllm serve" in card_md_of(run, "ct_w8a8_int8")
