"""Typed, versioned engine configs: a recipe is a placement plus one engine's config; it round-trips through its
JSON, refuses keys and versions it does not know, and reads the flat version-2 records older runs wrote."""

import json

import pytest

from qops.errors import TargetError
from qops.targets import (
    CONFIGS,
    BitsAndBytesConfig,
    GgufConfig,
    OrtConfig,
    OrtDecoderConfig,
    Placement,
    Recipe,
    config_class,
    get_target,
    list_targets,
)


@pytest.mark.parametrize("name", list_targets())
def test_every_target_round_trips_through_its_json(name):
    r = get_target(name)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["version"] == 3 and d["config"] == type(r.config).__name__
    assert d["config_version"] == type(r.config).VERSION and d["engine"] == r.engine
    assert Recipe.from_dict(d) == r


def test_each_engine_owns_only_its_options():
    gguf = get_target("gguf_q4_k_m")
    assert isinstance(gguf.config, GgufConfig)
    assert not gguf.has_option("quant_format") and not gguf.has_option("op_types")
    with pytest.raises(TargetError, match="GgufConfig"):
        gguf.with_options(quant_format="QDQ")
    with pytest.raises(AttributeError, match="GgufConfig"):
        _ = gguf.quant_format
    assert isinstance(get_target("hf_bnb_nf4").config, BitsAndBytesConfig)
    assert isinstance(get_target("llm_int4_rtn").config, OrtDecoderConfig)
    # placement options are shared by every engine
    assert gguf.with_options(hardware="my laptop").hardware == "my laptop"


def test_configs_are_registered_once_per_engine_and_model_kind():
    keys = [(c.ENGINE, c.MODEL_KIND) for c in CONFIGS.values()]
    assert len(keys) == len(set(keys))
    assert config_class("llama.cpp", "causal_lm") is GgufConfig
    assert config_class("onnxruntime", "any") is OrtConfig


def test_unknown_key_and_newer_versions_are_refused_on_load():
    d = get_target("x86_64_vnni_int8").to_dict()
    with pytest.raises(TargetError, match="unknown recipe key"):
        Recipe.from_dict({**d, "gguf_type": "Q4_K_M"})
    with pytest.raises(TargetError, match="newer qops"):
        Recipe.from_dict({**d, "version": 99})
    with pytest.raises(TargetError, match="upgrade qops"):
        Recipe.from_dict({**d, "config_version": 99})
    with pytest.raises(TargetError, match="calibration_method"):
        Recipe.from_dict({**d, "calibration_method": "mystery"})


def test_a_version_2_flat_record_keeps_its_engines_options():
    """What qops wrote before the split: every field of every engine in one record, no config name."""
    r = get_target("gguf_q4_k_m")
    legacy = {"target": r.target, "description": r.description, "version": 2, "engine": "llama.cpp",
              "model_kind": "causal_lm", "hardware": r.hardware, "runtime": r.runtime,
              "execution_provider": "llama.cpp CPU", "queue": "cpu", "mode": "weight_only", "precision": "int4",
              "gguf_type": "Q4_K_M", "imatrix": r.imatrix, "kv_cache_type": r.kv_cache_type,
              "quant_format": "QDQ", "op_types": ["MatMul"], "extra": {}, "granularity": "block-wise (32)"}
    back = Recipe.from_dict(legacy)
    assert isinstance(back.config, GgufConfig) and back.gguf_type == "Q4_K_M"
    assert not back.has_option("quant_format")


def test_config_problems_name_the_fix():
    with pytest.raises(TargetError, match="Fix:"):
        Recipe("bad", "", Placement(hardware="x"), OrtConfig(mode="dynamic", activation_type="int8"))
    with pytest.raises(TargetError, match="mode"):
        Recipe("bad", "", Placement(hardware="x"), OrtConfig(mode="cast", precision="int8"))


def test_card_facts_follow_the_engine():
    nf4 = get_target("hf_bnb_nf4").config.card_facts()
    assert nf4["weight_type"] == "nf4" and nf4["activation_type"] == "float"
    vnni = get_target("x86_64_vnni_int8").config.card_facts()
    assert (vnni["weight_type"], vnni["activation_type"]) == ("int8", "uint8")
