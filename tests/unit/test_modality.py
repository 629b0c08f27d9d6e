"""The model-family seam (qops/modality): which family a spec gets, which stages each family refuses (with the fix),
and the decisions a family makes before any work (whether the decoder needs its ONNX export, which architectures can
be exported, which FP32 model a graph target reads). Specs are real ``load_spec`` results; no model is run."""

from __future__ import annotations

import json

import pytest

from qops.errors import QopsError


def _spec(tmp_path, targets, kind="causal_lm"):
    from qops.spec import load_spec

    data = {"kind": kind, "pool": "p.parquet", "reference": "r.parquet", "validation": "v.parquet", "label": "text"}
    if kind != "causal_lm":
        data = {"pool": "p.parquet", "reference": "r.parquet", "validation": "v.parquet", "label": "y"}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"name": "t", "source_model": str(tmp_path), "targets": targets, "data": data}))
    return load_spec(path)


def test_a_spec_gets_the_family_its_data_kind_names(tmp_path):
    from qops.modality import MODALITIES, modality_for

    assert modality_for(_spec(tmp_path, ["gguf_q8_0"])) is MODALITIES["causal_lm"]
    assert modality_for(_spec(tmp_path, ["x86_64_vnni_int8"], kind="tabular")) is MODALITIES["graph"]


def test_the_onnx_export_is_made_only_for_onnx_runtime_decoder_targets(tmp_path):
    from qops.modality.causal_lm import needs_onnx

    assert not needs_onnx(_spec(tmp_path, ["gguf_q4_k_m", "ct_w8a8_int8", "hf_bnb_nf4"]))
    assert needs_onnx(_spec(tmp_path, ["gguf_q4_k_m", "llm_int4_rtn"]))


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2"])
def test_onnx_targets_on_an_architecture_the_exporter_cannot_take_are_refused_before_work(tmp_path, model_type):
    from qops.modality.causal_lm import CausalLmModality

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(QopsError, match=r"llm_int4_rtn.*cannot be exported.*Fix: use GGUF"):
        CausalLmModality.check_arch(_spec(tmp_path, ["llm_int4_rtn", "gguf_q8_0"]), tmp_path)
    assert CausalLmModality.check_arch(_spec(tmp_path, ["gguf_q8_0"]), tmp_path).model_type == model_type


def test_each_family_refuses_the_stage_it_has_not_with_the_fix(tmp_path):
    from qops.modality import MODALITIES

    with pytest.raises(QopsError, match="QLoRA fine-tuning does not apply to ONNX-graph models.*data.kind"):
        MODALITIES["graph"].finetune(None, None)
    with pytest.raises(QopsError, match="QAT does not apply to decoder-LLM models.*qlora"):
        MODALITIES["causal_lm"].qat(None, None, "gguf_q8_0", None, "")


def test_graph_targets_read_the_onnx_export_and_torch_targets_the_program():
    from qops.modality.graph import source_for
    from qops.targets import get_target

    src = {"path": "m.onnx", "pt2_path": "m.pt2", "uri": "models:/m/1", "flavor": "pytorch"}
    assert source_for(get_target("x86_64_vnni_int8"), src) == "m.onnx"
    assert source_for(get_target("torch_x86_int8"), src) == "m.pt2"
    with pytest.raises(QopsError, match="onnx-flavored.*serialization_format='pt2'"):
        source_for(get_target("torch_x86_int8"), {**src, "pt2_path": None, "flavor": "onnx"})


def test_qat_without_a_program_names_where_to_put_one(tmp_path):
    from types import SimpleNamespace

    from qops.modality.graph import torch_program

    spec = SimpleNamespace(qat=SimpleNamespace(program=None))  # the spec's qat block without a program
    with pytest.raises(QopsError, match="onnx-flavored.*qat.program"):
        torch_program(spec, {"uri": "models:/m/1", "flavor": "onnx"})
    (tmp_path / "m.pt2").write_bytes(b"")
    assert torch_program(spec, {"uri": "u", "flavor": "pytorch", "pt2_path": str(tmp_path / "m.pt2")}).endswith("m.pt2")
