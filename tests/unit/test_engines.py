"""The engine seam: every target is served by exactly one registered engine; the one quantize verb routes every
target (graph and decoder) and refuses combinations that cannot work before any work (exit 2 naming the fix);
folder artifacts carry a manifest that the registration re-checks; qops' sequential GPTQ carries each layer's
inputs forward and equals re-running the model per layer. Decoders are built from configs with random weights and a
byte-level BPE tokenizer trained here in a second (fast; fidelity to their own FP32 outputs only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qops.errors import DataError, QopsError

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog while the model counts tokens {i * 7}"
         for i in range(40)]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qops.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A 2-layer Llama of hidden size 96 (not a multiple of 128: as SmolLM2's 576), random weights, saved with a
    trained tokenizer; and a calibration parquet of texts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qops.examples.tiny_llama import train_tokenizer

    root = tmp_path_factory.mktemp("dec")
    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf", safe_serialization=True)
    tok.save_pretrained(root / "hf")
    pd.DataFrame({"text": TEXTS}).to_parquet(root / "calib.parquet")
    return root


def test_every_target_has_exactly_one_engine_and_the_engine_owns_its_format():
    from qops.engines import engine_for
    from qops.targets import list_targets

    seen = {}
    for name, recipe in list_targets().items():
        e = engine_for(recipe)  # raises unless exactly one engine claims the recipe
        seen[name] = e.name
        assert (e.artifact == "file") == bool(e.suffix)
    assert seen["x86_64_vnni_int8"] == "onnxruntime" and seen["gguf_q4_k_m"] == "llama_cpp"
    assert seen["llm_int4_rtn"] == "ort_genai" and seen["ct_w8a8_int8"] == "compressed_tensors"
    assert seen["hf_bnb_nf4"] == "bitsandbytes" and seen["llm_int4_hqq"] == "ort_genai"


@pytest.mark.parametrize("target,output,message", [
    ("gguf_q4_k_m", "out.gguf", "quantizes a Hugging Face checkpoint folder"),
    ("ct_w8a8_int8", "out_ct", "quantizes a Hugging Face checkpoint folder"),
    ("hf_bnb_nf4", "out_bnb", "quantizes a Hugging Face checkpoint folder"),
    ("llm_int4_hqq", "out_llm", "quantizes a Hugging Face checkpoint folder"),
    ("x86_64_int8_dynamic", "out.gguf", "ends in '.gguf'"),
])
def test_quantize_refuses_what_cannot_work_on_an_onnx_graph(tmp_path, target, output, message):
    """Formerly: a GGUF, compressed-tensors or HQQ target silently wrote an ONNX model and exited 0."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    r = _cli("quantize", "--model", tmp_path / "m.onnx", "--target", target, "--output", tmp_path / output)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Fix:" in r.stderr
    assert not (tmp_path / output).exists()
    if target == "x86_64_int8_dynamic":  # the verb's tuning= is for decoders: a graph target refuses it, not ignores it
        from qops.engines import quantize
        from qops.spec import TuningSpec

        with pytest.raises(QopsError, match="tuning= is for decoder targets.*qops.quantize.tune.tune"):
            quantize(tmp_path / "m.onnx", target, tmp_path / "o.onnx", tuning=TuningSpec())


def test_graph_targets_refuse_a_checkpoint_folder_and_folder_targets_a_file_output(decoder, tmp_path):
    r = _cli("quantize", "--model", decoder / "hf", "--target", "x86_64_int8_dynamic", "--output", tmp_path / "o.onnx")
    assert r.returncode == 2 and "not a Hugging Face checkpoint folder" in r.stderr and "llm_*" in r.stderr
    r = _cli("quantize", "--model", decoder / "hf", "--target", "ct_w8a8_int8", "--output", tmp_path / "o.onnx",
             "--calibration", decoder / "calib.parquet")
    assert r.returncode == 2 and "writes a folder" in r.stderr


def test_cli_writes_a_gguf_from_a_checkpoint_folder_alone(decoder, tmp_path):
    """Q4_K_M with an importance matrix from the texts; rows of 96 fall back from the k-quants, and the notes say
    so with the cause and the effective bits per weight."""
    out = tmp_path / "model.gguf"
    r = _cli("quantize", "--model", decoder / "hf", "--target", "gguf_q4_k_m", "--output", out, "--calibration",
             decoder / "calib.parquet", "--max-length", "32", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["engine_name"] == "llama_cpp" and out.read_bytes()[:4] == b"GGUF"
    assert Path(res["recipe_path"]).is_file() and res["calibration_rows"] == len(TEXTS)
    assert "tied to the embeddings" in res["technique"]["lm_head"]  # was "?" for tied embeddings
    assert any("fell back from Q4_K_M" in n and "rows of 96" in n for n in res["notes"])
    assert any("effective bits per weight" in n for n in res["notes"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qops-")]  # the work folder is gone


def test_compressed_tensors_picks_a_group_that_divides_and_the_registration_rechecks_the_folder(decoder, tmp_path):
    """Hidden size 96 is no multiple of the recipe's 128-groups: GPTQ used to crash with an IndexError; now the group
    is 32 and the card says why. Then one file of the folder is edited after quantization: the register stage's
    integrity check names it and refuses."""
    from qops.engines import quantize
    from qops.pipeline import check_model_hash
    from qops.spec.data import CausalLMSpec

    out = tmp_path / "ct"
    res = quantize(decoder / "hf", "ct_w4a16_gptq", out, calibration=decoder / "calib.parquet",
                   causal_lm=CausalLMSpec(seq_len=32, stride=16))
    assert "32 (the recipe's 128" in res.technique["group_size"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert set(res.manifest) >= {"config.json", "model.safetensors", "tokenizer.json"}
    q = json.loads(json.dumps(res.__dict__, default=str))
    check_model_hash(q)  # untouched: passes
    cfg["note"] = "edited after the gate"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QopsError, match=r"changed since: config\.json"):
        check_model_hash(q)


def test_sequential_gptq_carries_layer_inputs_forward_and_equals_rerunning_the_model(decoder):
    """The carried-forward schedule gives the same weights as the old one (the whole model re-run over the windows
    for each layer), with two layer passes per layer instead of a model pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from qops.llm.data import causal_lm_kind
    from qops.llm.source import LlmInfo
    from qops.llm.torch_quant import decoder_layers, forward_windows, gptq, gptq_weight
    from qops.spec.data import CausalLMSpec

    hf = decoder / "hf"
    windows = causal_lm_kind(CausalLMSpec(seq_len=32, stride=16), str(hf), LlmInfo.from_hf(hf)).windows(
        pd.DataFrame({"text": TEXTS[:8]}), "calibration")
    new = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    gptq(new, windows, 4, 32)
    old = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    for layer in decoder_layers(old):  # the former schedule, written out
        lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        hs = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in lins}
        n = {m: 0 for m in lins}

        def hook(m, a, o):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
            hs[m] += 2 * x.T @ x
            n[m] += len(x)

        handles = [m.register_forward_hook(hook) for m in lins]
        forward_windows(old, windows)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for m in lins:
                m.weight.copy_(gptq_weight(m.weight.detach(), hs[m] / n[m], 4, 32)[0])
    for (name, a), (_, b) in zip(new.named_parameters(), old.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_cli_tunes_a_decoder_target_on_held_out_calibration_texts(decoder, tmp_path):
    """``qops quantize --tune`` on a checkpoint folder: no --validation needed (trials are scored on held-out
    calibration documents), the trial table printed, exit 0 when the chosen candidate passes and 3 when none can
    (an impossible --threshold), the folder in place either way. A causal_lm spec with tuning is accepted."""
    from qops.spec import load_spec

    r = _cli("quantize", "--model", decoder / "hf", "--target", "llm_int4_rtn", "--calibration",
             decoder / "calib.parquet", "--max-length", 32, "--tune", "--max-trials", 2,
             "--threshold", "perplexity_increase<=5", "--output", tmp_path / "q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trial  1" in r.stdout and "<- chosen" in r.stdout and "held-out calibration documents" in r.stdout
    assert (tmp_path / "q" / "model.onnx").is_file()
    r = _cli("quantize", "--model", decoder / "hf", "--target", "llm_int4_rtn", "--calibration",
             decoder / "calib.parquet", "--max-length", 32, "--tune", "--max-trials", 1,
             "--threshold", "agreement>=1.5", "--output", tmp_path / "q2")
    assert r.returncode == 3 and "NO candidate passed" in r.stdout, r.stderr[-2000:]
    spec = {"name": "t", "source_model": str(tmp_path), "targets": ["llm_int4_rtn"], "tuning": {"enabled": True},
            "data": {"kind": "causal_lm", "pool": "p.parquet", "reference": "r.parquet", "validation": "v.parquet",
                     "label": "text"}}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec))
    assert load_spec(path).tuning.enabled


def test_cli_runs_hqq_for_llm_int4_hqq_into_a_genai_folder(decoder, tmp_path):
    """Formerly ``--target llm_int4_hqq`` on an ONNX model wrote round-to-nearest; from a checkpoint folder it runs
    ONNX Runtime's HQQ on the FP32 export (made in a temporary folder) and writes a GenAI folder."""
    out = tmp_path / "q"
    r = _cli("quantize", "--model", decoder / "hf", "--target", "llm_int4_hqq", "--output", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["engine_name"] == "ort_genai" and res["technique"]["algorithm"] == "hqq"
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert res["technique"]["ops"].get("MatMulNBits", 0) >= 7  # q/k/v/o/gate/up/down of each layer
    # tied embeddings: the lookup reads the lm_head's 8-bit table (stored once); no FP32 copy stays for a Transpose
    assert res["technique"]["ops"].get("GatherBlockQuantized") == 1 and "sharing" in res["technique"]["embeddings"]
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    m = onnx.load(str(out / "model.onnx"))
    fp32 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims and
            len(i.dims) == 2 and i.dims[0] * i.dims[1] > 10_000}
    assert not fp32, fp32  # the tables only in their quantized form
    gather = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    assert gather.input[0] == head.input[1]  # one initializer for both
    # a lookup returns exactly the lm_head's dequantized rows (code - 128) x scale
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    blob, scales = inits[head.input[1]], inits[head.input[2]].reshape(inits[head.input[1]].shape[0], -1)
    rows = (blob.astype(np.float32) - 128) * scales[..., None]
    sub = onnx.helper.make_graph([gather, *[n for n in m.graph.node if n.input and n.input[0] == gather.output[0]]],
                                 "lookup", [onnx.helper.make_tensor_value_info(gather.input[1], onnx.TensorProto.INT64,
                                                                               [1, None])],
                                 [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
                                 [i for i in m.graph.initializer if i.name in gather.input or i.name.endswith("_shape")])
    reshape = sub.node[1]
    reshape.output[0] = "out"
    got = ort.InferenceSession(onnx.helper.make_model(sub, opset_imports=list(m.opset_import), ir_version=10)
                               .SerializeToString()).run(None, {gather.input[1]: np.array([[3, 7, 11]])})[0]
    assert np.array_equal(got[0], rows[[3, 7, 11]].reshape(3, -1))
    assert res["source_path"] == str(decoder / "hf") and 0 < res["size_ratio"] < 0.6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qops-")]


def test_a_gguf_source_is_dequantized_into_the_folder_every_engine_reads(decoder, tmp_path):
    """source_model: a .gguf file. llama.cpp's converter writes the decoder as F32 GGUF; the source resolution
    dequantizes it once into a Transformers folder (same logits, same tokens) with its provenance, and reuses it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qops.llm.gguf import convert_hf
    from qops.llm.source import resolve_hf_dir

    gg = tmp_path / "dec-f32.gguf"
    convert_hf(decoder / "hf", gg)
    src = resolve_hf_dir(str(gg), tmp_path / "run")
    assert src["flavor"] == "gguf" and src["provenance"]["sha256"] and "dequantized GGUF" in src["provenance"]["note"]
    hf = Path(src["hf_dir"])
    ids = torch.as_tensor(AutoTokenizer.from_pretrained(str(decoder / "hf"))(TEXTS[3])["input_ids"])[None]
    assert AutoTokenizer.from_pretrained(str(hf))(TEXTS[3])["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(decoder / "hf"), dtype=torch.float32)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)(input_ids=ids).logits
    assert float((got - ref).abs().max()) < 1e-4
    stamp = (hf / "model.safetensors").stat().st_mtime_ns
    assert resolve_hf_dir(str(gg), tmp_path / "run")["hf_dir"] == str(hf)
    assert (hf / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not dequantized again


@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, True)])
def test_onnx_gptq_is_qops_gptq_reproduced_exactly_by_onnx_runtimes_integers(decoder, tmp_path, symmetric, act_order):
    """llm_int4_gptq no longer runs ONNX Runtime's GPTQ (about 30 minutes on a 135 M model): qops' sequential GPTQ
    puts the checkpoint's weights on ONNX Runtime's signed-scale grid, and the MatMulNBits blobs ONNX Runtime's RTN
    writes from its export, with the grid's own codes and scales, dequantize back to exactly those weights (plain
    round-to-nearest's absmax/8 would not: a block whose largest value GPTQ rounded to -7 gets another scale).
    Asymmetric GPTQ (integer zero points, with activation order and static groups) is written with its zero points
    the same way."""
    import onnx
    from onnx import numpy_helper

    from qops.llm.data import causal_lm_kind
    from qops.llm.quantize import gptq_checkpoint, quantize_onnx_llm
    from qops.llm.source import LlmInfo, export_onnx
    from qops.spec.data import CausalLMSpec
    from qops.targets import get_target

    hf = decoder / "hf"
    windows = causal_lm_kind(CausalLMSpec(seq_len=32, stride=16), str(hf), LlmInfo.from_hf(hf)).windows(
        pd.DataFrame({"text": TEXTS[:8]}), "calibration")
    ck = gptq_checkpoint(hf, windows, 32, tmp_path / "gptq", symmetric=symmetric, act_order=act_order,
                         clip_search=act_order)
    assert ck["group"] == 32 and ck["windows"] == len(windows)
    ex = export_onnx(ck["hf_dir"], tmp_path / "onnx")
    out = tmp_path / "q" / "model.onnx"
    quantize_onnx_llm(ex["path"], get_target("llm_int4_rtn", {"block_size": 32, "symmetric_weights": symmetric}),
                      out, None, on_grid=True)
    fp32 = {i.name: numpy_helper.to_array(i) for i in onnx.load(ex["path"]).graph.initializer}
    q = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    checked = 0
    for n in q.graph.node:
        if n.op_type != "MatMulNBits" or "lm_head" in n.name or dict(
                (a.name, a.i) for a in n.attribute).get("bits") != 4:
            continue
        blob = inits[n.input[1]]
        scales = inits[n.input[2]].reshape(blob.shape[0], -1)
        assert (len(n.input) > 3) != symmetric  # zero points exactly when asymmetric
        if symmetric:
            zeros = np.full(scales.shape, 8.0)
        else:
            zp = inits[n.input[3]]
            zeros = np.stack([zp & 0xF, zp >> 4], -1).reshape(blob.shape[0], -1)[:, :scales.shape[1]]
        codes = np.stack([blob & 0xF, blob >> 4], -1).reshape(blob.shape[0], -1).astype(np.float32)
        deq = (codes - np.repeat(zeros, 32, axis=1)) * np.repeat(scales, 32, axis=1)
        w = fp32[n.input[1].replace("_Q4", "")].T  # [N, K]
        assert np.abs(deq[:, :w.shape[1]] - w).max() <= 1e-6 * np.abs(w).max(), n.name
        checked += 1
    assert checked >= 2 * 4  # q/k/v (fused), o, gate, up, down of 2 layers


def test_sensitivity_file_keeps_the_costliest_layers_8_bit(decoder, tmp_path):
    """`qops sensitivity` measures each layer's KL cost at 4 bits and writes a versioned override file; an INT4
    target given it keeps those layers' MatMuls 8-bit (mixed INT4/INT8), says so in its notes, and refuses a file of
    another version (exit 2)."""
    import onnx

    sens = tmp_path / "sens.json"
    r = _cli("sensitivity", "--model", decoder / "hf", "--calibration", decoder / "calib.parquet", "--output", sens,
             "--keep", "1", "--max-length", "32", "--windows", "6", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(sens.read_text())
    assert doc["qops_tensor_overrides"] == 1 and set(doc["layers"]) == {"layers.0", "layers.1"}
    worst = max(doc["layers"], key=lambda k: doc["layers"][k]["kl"])
    assert doc["overrides"] == {worst: "int8"} and all(v["kl"] > 0 for v in doc["layers"].values())
    out = tmp_path / "q"
    r = _cli("quantize", "--model", decoder / "hf", "--target", "llm_int4_rtn", "--output", out, "--option",
             f"tensor_overrides={sens}", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["technique"]["eight_bit_layers"] == [worst] and any("mixed INT4/INT8" in n for n in res["notes"])
    bits = {n.name: {a.name: a.i for a in n.attribute}.get("bits") for n in onnx.load(str(out / "model.onnx")).graph.node
            if n.op_type == "MatMulNBits"}
    assert {b for name, b in bits.items() if name.startswith(f"/model/{worst}/")} == {8}
    assert {b for name, b in bits.items() if name.startswith("/model/layers.") and f"/{worst}/" not in name} == {4}
    doc["qops_tensor_overrides"] = 99
    sens.write_text(json.dumps(doc))
    r = _cli("quantize", "--model", decoder / "hf", "--target", "llm_int4_rtn", "--output", tmp_path / "q2",
             "--option", f"tensor_overrides={sens}")
    assert r.returncode == 2 and "version-1" in r.stderr


def test_the_graph_function_refuses_decoder_targets_instead_of_writing_onnx(tmp_path):
    """qops.quantize.quantize (the graph engines' function) used to send any non-torchao recipe to ONNX Runtime."""
    from qops.quantize import quantize as graph_quantize

    with pytest.raises(QopsError, match="qops.engines.quantize"):
        graph_quantize(tmp_path / "m.onnx", "gguf_q4_k_m", tmp_path / "out.gguf")


@pytest.mark.parametrize("symmetric,act_order,mse", [(True, False, False), (True, True, True), (False, False, False),
                                                     (False, True, False), (False, True, True)])
def test_gptq_variants_stay_on_their_grid_and_beat_round_to_nearest(symmetric, act_order, mse):
    """Symmetric and asymmetric GPTQ, in column order and in activation order (static groups): every quantized
    weight is (integer code - zero) x its group's scale with codes in the 4-bit range, and the layer's output error on
    correlated inputs with a few loud channels is well below round-to-nearest's on the same grid."""
    import torch

    from qops.llm.torch_quant import gptq_weight, group_grid

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    x = (torch.randn(2048, 64, generator=g) @ mix) * torch.where(torch.arange(64) % 13 == 0, 6.0, 1.0)
    w = torch.randn(48, 64, generator=g) / 8 + 0.02
    h = 2 * x.T @ x / len(x)
    wq, scales, *zeros = gptq_weight(w, h, 4, 16, symmetric=symmetric, act_order=act_order, mse=mse)
    zeros = zeros[0] if zeros else torch.zeros_like(scales)
    codes = wq / scales.repeat_interleave(16, 1) + zeros.repeat_interleave(16, 1)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= lo - 1e-3 and codes.max() <= hi + 1e-3
    rtn = torch.cat([(torch.clamp(torch.round(b / s[:, None]) + z[:, None], lo, hi) - z[:, None]) * s[:, None]
                     for b in w.split(16, 1) for s, z, *_ in [group_grid(b, 4, symmetric)]], 1)
    err = lambda q: float(((x @ (q - w).T) ** 2).mean())  # noqa: E731
    assert err(wq) < 0.8 * err(rtn)
    if mse:  # the clip search only ever picks a grid with less rounding error than min-max
        s_mm, z_mm, *_ = group_grid(w[:, :16], 4, symmetric)
        s_cs, z_cs, *_ = group_grid(w[:, :16], 4, symmetric, mse=True)
        rq = lambda s, z: (torch.clamp(torch.round(w[:, :16] / s[:, None]) + z[:, None], lo, hi) - z[:, None]) \
            * s[:, None]  # noqa: E731
        e = lambda q: ((q - w[:, :16]).abs() ** 2.4).sum(-1)  # noqa: E731
        assert (e(rq(s_cs, z_cs)) <= e(rq(s_mm, z_mm)) + 1e-9).all() and (e(rq(s_cs, z_cs)) < e(rq(s_mm, z_mm))).any()



def test_llm_tuning_scores_trials_on_held_out_calibration_documents_and_keeps_the_rule(decoder, tmp_path):
    """tuning for a decoder target: candidates of the engine's space quantized on the fit documents and scored on the
    held-out ones (every 4th, never fitted), judged by the spec's gates; with a gate everything passes the smallest
    candidate wins, with a gate nothing can pass the most faithful one is kept and marked failed. The chosen artifact
    is at the output, loads, and its trial folder is gone."""
    from qops.engines import LlmInputs, engine_for
    from qops.engines.llm_tune import llm_space, split_windows, tune_llm
    from qops.llm.data import causal_lm_kind
    from qops.llm.runner import open_decoder
    from qops.llm.source import LlmInfo
    from qops.spec import GateSpec
    from qops.spec.data import CausalLMSpec
    from qops.spec.training import TuningSpec
    from qops.targets import get_target

    hf = decoder / "hf"
    info = LlmInfo.from_hf(hf)
    windows = causal_lm_kind(CausalLMSpec(seq_len=32, stride=16), str(hf), info).windows(
        pd.DataFrame({"text": TEXTS[:16]}), "calibration")
    fit, held = split_windows(windows)
    assert {w.row for w in held} == {3, 7, 11, 15} and not {w.row for w in fit} & {w.row for w in held}
    recipe = get_target("llm_int4_rtn")
    space = llm_space(recipe)
    assert space[0] == {} and {"algorithm": "gptq", "symmetric_weights": False, "act_order": True,
                                "clip_search": True} in space
    engine = engine_for(recipe)
    cfg = TuningSpec(enabled=True, max_trials=3, bootstrap=50)
    lenient = GateSpec(task="causal_lm", max_overall_drop=100.0)
    out = tmp_path / "lenient"
    res = tune_llm(engine, hf, recipe, out, LlmInputs(hf_dir=hf, info=info, work_dir=tmp_path, windows=windows),
                   cfg, lenient)
    assert len(res.trials) == 3 and sum(t.get("chosen", False) for t in res.trials) == 1
    done = [t for t in res.trials if t["verdict"] != "error"]
    chosen = next(t for t in res.trials if t.get("chosen"))
    assert res.passed and chosen["passed"] and chosen["size_ratio"] <= min(t["size_ratio"] for t in done) * 1.05
    assert res.tuning["held_out"]["documents"] == 4 and res.tuning["fit_windows"] == len(fit)
    assert Path(res.model_path) == out / "model.onnx" and Path(res.model_path).is_file()
    assert open_decoder(res.model_path, info).prefill(np.arange(1, 9)).shape[-1] == info.vocab_size
    assert not list(tmp_path.glob(".lenient.trials-*"))
    impossible = GateSpec(task="causal_lm", thresholds=[{"metric": "agreement", "min_value": 1.5}])
    res2 = tune_llm(engine, hf, recipe, tmp_path / "strict", LlmInputs(hf_dir=hf, info=info, work_dir=tmp_path,
                    windows=windows), TuningSpec(enabled=True, max_trials=2, bootstrap=0), impossible)
    kl = {t["trial"]: t["metrics"]["kl_divergence"] for t in res2.trials if t["verdict"] != "error"}
    assert res2.passed is False and res2.tuning["chosen_trial"] == min(kl, key=kl.get)
    assert "agreement" in " ".join(res2.trials[0]["reasons"])


def test_part_sensitivity_and_gptq_keep_overridden_parts_fp32_for_the_8_bit_pass(decoder, tmp_path):
    """At ``part`` granularity each layer's attention and MLP are measured apart, with their weight counts (the size
    an override adds); the override keys map onto the ONNX export's MatMuls of exactly that part; GPTQ leaves the
    overridden modules' FP32 weights untouched (the 8-bit pass rounds them from FP32, not from 4-bit codes) and
    rounds every other module to its 4-bit grid."""
    from safetensors.torch import load_file

    from qops.llm.data import causal_lm_kind
    from qops.llm.quantize import gptq_checkpoint
    from qops.llm.sensitivity import layer_sensitivity, override_nodes
    from qops.llm.source import LlmInfo, export_onnx
    from qops.spec.data import CausalLMSpec

    hf = decoder / "hf"
    windows = causal_lm_kind(CausalLMSpec(seq_len=32, stride=16), str(hf), LlmInfo.from_hf(hf)).windows(
        pd.DataFrame({"text": TEXTS[:8]}), "calibration")
    doc = layer_sensitivity(hf, windows[:4], 32, keep=1, granularity="part")
    assert set(doc["layers"]) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn", "mlp")}
    assert doc["layers"]["layers.0.mlp"]["weights"] == 3 * 96 * 192
    assert doc["layers"]["layers.0.self_attn"]["weights"] == 2 * 96 * 96 + 2 * 96 * 32
    assert len(doc["overrides"]) == 1 and all(v["kl"] > 0 for v in doc["layers"].values())
    # each group is measured from its layer's FP32 inputs onwards: the same KL as the whole model run again
    import torch
    from transformers import AutoModelForCausalLM

    from qops.llm.torch_quant import fake_quant, qparams

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ids = [torch.as_tensor(np.asarray(w.ids))[None] for w in windows[:4]]
    with torch.inference_mode():
        ref = [torch.log_softmax(model(input_ids=i).logits[0], -1) for i in ids]
        for key, part in (("layers.0.mlp", model.model.layers[0].mlp), ("layers.1.self_attn",
                                                                         model.model.layers[1].self_attn)):
            lins = [m for m in part.modules() if isinstance(m, torch.nn.Linear)]
            saved = [m.weight.clone() for m in lins]
            for m in lins:
                scale, qmin, qmax = qparams(m.weight, 4, 32)
                m.weight.copy_(fake_quant(m.weight, scale, qmin, qmax, 32))
            got = [torch.log_softmax(model(input_ids=i).logits[0], -1) for i in ids]
            kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got)) / sum(len(r) for r in ref)
            assert doc["layers"][key]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6), key
            for m, w in zip(lins, saved):
                m.weight.copy_(w)
    with pytest.raises(DataError, match="granularity"):
        layer_sensitivity(hf, windows[:1], 32, granularity="tensor")

    import onnx

    names = [n.name for n in onnx.load(export_onnx(hf, tmp_path / "onnx")["path"]).graph.node
             if n.op_type == "MatMul"]
    mlp = override_nodes({"overrides": {"layers.1.mlp": "int8"}}, names)
    attn = override_nodes({"overrides": {"layers.0.self_attn": "int8"}}, names)
    assert mlp and all(n.startswith("/model/layers.1/mlp/") for n in mlp)
    assert attn and all(n.startswith("/model/layers.0/attn/") for n in attn)
    assert len(override_nodes({"overrides": {"layers.1": "int8"}}, names)) == len(mlp) + len(
        override_nodes({"overrides": {"layers.1.self_attn": "int8"}}, names))

    ck = gptq_checkpoint(hf, windows, 32, tmp_path / "gptq", symmetric=False, act_order=True,
                         overrides={"overrides": {"layers.1.mlp": "int8"}})
    assert ck["fp32_for_8_bit"] == 3
    before, after = load_file(str(hf / "model.safetensors")), load_file(str(Path(ck["hf_dir"]) / "model.safetensors"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.1.mlp.{name}.weight"
        assert torch_equal(before[key], after[key]), key
        assert not torch_equal(before[f"model.layers.0.mlp.{name}.weight"], after[f"model.layers.0.mlp.{name}.weight"])
    assert not torch_equal(before["model.layers.1.self_attn.o_proj.weight"], after["model.layers.1.self_attn.o_proj.weight"])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_llm_tuning_searches_mixed_int4_int8_by_measured_sensitivity(decoder, tmp_path):
    """The INT4 space has mixed INT4/INT8 candidates (the N costliest attention/MLP groups by measured sensitivity
    kept 8-bit), unless the recipe already names its 8-bit layers; a chosen one keeps its override file beside the
    artifact and its recipe names it, and the artifact's MatMuls of that group are 8-bit, the others 4-bit."""
    import onnx

    from qops.engines import LlmInputs, engine_for
    from qops.engines.llm_tune import MIXED, llm_space, tune_llm
    from qops.llm.data import causal_lm_kind
    from qops.llm.sensitivity import read_overrides
    from qops.llm.source import LlmInfo
    from qops.spec import GateSpec
    from qops.spec.data import CausalLMSpec
    from qops.spec.training import TuningSpec
    from qops.targets import get_target

    recipe = get_target("llm_int4_gptq")
    assert {o.get(MIXED) for o in llm_space(recipe)} >= {4, 10}
    assert not any(MIXED in o for o in llm_space(recipe.with_options(tensor_overrides=str(tmp_path / "s.json"))))
    hf = decoder / "hf"
    info = LlmInfo.from_hf(hf)
    windows = causal_lm_kind(CausalLMSpec(seq_len=32, stride=16), str(hf), info).windows(
        pd.DataFrame({"text": TEXTS[:16]}), "calibration")
    out = tmp_path / "mixed"
    res = tune_llm(engine_for(recipe), hf, recipe, out, LlmInputs(hf_dir=hf, info=info, work_dir=tmp_path,
                   windows=windows), TuningSpec(enabled=True, max_trials=1, bootstrap=0),
                   GateSpec(task="causal_lm", max_overall_drop=100.0), space=[{MIXED: 1}])
    sidecar = tmp_path / "mixed.tensor_overrides.json"
    assert res.trials[0]["chosen"] and res.recipe["tensor_overrides"] == str(sidecar)
    (group,) = read_overrides(sidecar)["overrides"]
    assert len(read_overrides(sidecar)["layers"]) == 4  # 2 layers x (attention, MLP)
    prefix = "/model/" + group.replace(".self_attn", "/attn").replace(".mlp", "/mlp") + "/"
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in onnx.load(str(out / "model.onnx")).graph.node
            if n.op_type == "MatMulNBits" and n.name.startswith("/model/layers.")}
    assert {b for n, b in bits.items() if n.startswith(prefix)} == {8}
    assert {b for n, b in bits.items() if not n.startswith(prefix)} == {4}
    assert res.technique["eight_bit_layers"] == [group] and not list(tmp_path.glob(".mixed.trials-*"))
