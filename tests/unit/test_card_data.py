"""CardData: the card's front matter as a typed object, written by front_matter() and read back by CardData.load()."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qops.cards import CardData, EvalResult, Metric, build_card_data, render_markdown, write_card
from qops.errors import DataError, QopsError

# HTML, Markdown table and YAML syntax, a '---' line and non-ASCII text: all user-controlled (source name and URI)
NASTY = "<script>alert('x')</script> & <b>|pipe|</b>\n---\n#: not: yaml, ü \\ \"q\""


def test_written_card_loads_back_equal(card_inputs, tmp_path):
    card = build_card_data(**card_inputs)
    res = write_card(card, tmp_path)
    loaded = CardData.load(Path(res.markdown_path))
    assert loaded == CardData.from_card(card)
    assert loaded == CardData.load(res.markdown_path)  # a str path too
    assert loaded == CardData.load(Path(res.markdown_path).read_text())  # and the Markdown itself
    assert loaded.base_model == "models:/m@champion" and loaded.base_model_relation == "quantized"
    assert loaded.model_name == "m (arm64_int8)" and loaded.library_name == card["quantization"]["runtime"]
    assert loaded.tags == ("qops", "quantized", "arm64_int8", "int8") and loaded.license is None
    assert loaded.card_schema == "1.0" and loaded.gate_passed is card["gates"]["passed"]
    (result,) = loaded.results
    assert result.task_type == "tabular-classification" and result.dataset_type == "p"
    overall = card["quantitative_analyses"]["overall"]
    assert {m.type: m.value for m in result.metrics} == {k: v["quantized"] for k, v in overall.items()
                                                         if v["quantized"] is not None}
    assert {"accuracy", "f1", "roc_auc"} <= {m.type for m in result.metrics}


def test_front_matter_is_rendered_from_card_data(card_inputs):
    card = build_card_data(**card_inputs)
    md = render_markdown(card)
    data = CardData.from_card(card)
    assert md.startswith(data.to_front_matter()) and data.to_front_matter() == "---\n" + data.to_yaml() + "---\n"
    assert yaml.safe_load(md.split("---\n")[1]) == data.to_dict()
    assert list(data.to_dict()) == ["base_model", "base_model_relation", "library_name", "tags", "model-index",
                                    "qops"]


def test_user_text_survives_the_round_trip_exactly(card_inputs, tmp_path):
    inputs = copy.deepcopy(card_inputs)
    inputs["source"] = {**inputs["source"], "uri": NASTY, "name": NASTY}
    card = build_card_data(**inputs)
    loaded = CardData.load(Path(write_card(card, tmp_path).markdown_path))
    assert loaded.base_model == NASTY and loaded.model_name == f"{NASTY} (arm64_int8)"
    assert loaded == CardData.from_card(card)


def test_missing_fields_load_as_documented_defaults():
    data = CardData.load("---\nbase_model: models:/m/1\nlanguage: en\n---\n# A hand-written card\n")
    assert data.base_model == "models:/m/1"
    assert (data.model_name, data.library_name, data.license, data.card_schema, data.gate, data.gate_passed) == (
        None,) * 6
    assert data.tags == () and data.results == ()
    assert data.extra == {"language": "en"}  # a key qops does not write is kept and written back
    assert data.to_dict() == {"base_model": "models:/m/1", "language": "en"}
    assert CardData.load("---\n---\nbody\n") == CardData()
    assert CardData.load(CardData().to_front_matter()) == CardData()


def test_a_typed_object_round_trips_through_yaml():
    data = CardData(model_name="m", base_model="b", license="apache-2.0", tags=("a", "1.0", "null"),
                    results=(EvalResult("tabular-regression", "validation", "p", (Metric("mae", 3), Metric("r2", 0.5,
                                                                                                         "r2 (q)"))),),
                    card_schema="1.0", gate="failed")
    assert CardData.load(data.to_front_matter() + "text") == data
    assert data.gate_passed is False and data.to_dict()["license"] == "apache-2.0"


@pytest.mark.parametrize("text, says", [
    ("# Model card\n\nno metadata\n", "has no YAML front matter"),
    ("---\nbase_model: [unclosed\n---\n", "not valid YAML"),
    ("---\n- a\n- b\n---\n", "is a list, not a mapping"),
    ("---\ntags: quantized\n---\n", "tags must be a list, not str"),
    ("---\ntags: [qops, 8]\n---\n", "tags[1] must be a string, not int"),
    ("---\nbase_model: {a: 1}\n---\n", "base_model must be a string, not dict"),
    ("---\nmodel-index:\n- name: m\n  results:\n  - metrics:\n    - {type: accuracy, value: high}\n---\n",
     "model-index[0].results[0].metrics[0].value must be a number, not str"),
    ("---\nmodel-index:\n- name: m\n  results:\n  - metrics:\n    - {type: accuracy, value: true}\n---\n",
     "value must be a number, not bool"),
    ("---\nmodel-index:\n- results:\n  - metrics:\n    - {value: 0.5}\n---\n", "metrics[0] has no type"),
    ("---\nmodel-index: [{name: a}, {name: b}]\n---\n", "model-index has 2 entries"),
    ("---\nqops: {gate: maybe}\n---\n", "qops.gate is 'maybe'"),
    ("---\nbase_model: !!python/object/apply:os.system [echo pwned]\n---\n", "not valid YAML"),
])
def test_broken_front_matter_is_a_clear_data_error(text, says):
    with pytest.raises(DataError) as e:
        CardData.load(text)
    assert says in str(e.value) and e.value.fix  # names the problem and the fix
    assert isinstance(e.value, QopsError)  # the CLI's exit 2


def test_a_missing_card_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="Cannot read the model card .*nope.md"):
        CardData.load(tmp_path / "nope.md")
