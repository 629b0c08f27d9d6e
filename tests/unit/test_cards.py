import json

from qops.cards import build_card_data, render_markdown, write_card
from qops.gates import gate
from qops.spec import GateSpec
from qops.targets import get_target


def _evaluation():
    side = lambda acc, lat, size: {  # noqa: E731
        "overall": acc, "size_bytes": size, "latency_p50_ms": lat, "latency_p90_ms": lat * 1.2,
        "slices": {"sex=female": {"value": acc - 0.01, "n": 60}, "sex=<script>alert(1)</script>": {"value": acc, "n": 40}},
        "fairness": {"sex": {"demographic_parity_difference": 0.05, "equalized_odds_difference": 0.1}},
    }
    return {"metric": "accuracy", "rows": 100, "label": "y", "slice_columns": ["sex"], "validation": "val.parquet",
            "fp32": side(0.8, 0.1, 4_000_000), "quantized": side(0.79, 0.05, 1_000_000), "agreement": 0.98,
            "hardware": {"cpu_model": "Test CPU", "isa": ["avx2"]}, "latency_method": "batch 1"}


def _card(human=None):
    ev = _evaluation()
    g = gate(ev, GateSpec())
    from qops.artifacts import to_jsonable

    return build_card_data(
        pipeline="p", source={"uri": "models:/m@champion", "name": "m", "version": "3"},
        target_recipe=get_target("x86_64_vnni_int8").to_dict(),
        calibration={"rows": 50, "sha256": "ab" * 32, "strategy": "stratified", "seed": 0, "pool": "pool.parquet",
                     "rows_per_slice": {"sex": {"female": 20, "male": 30}}, "drift_passed": True,
                     "drifted_columns": [], "drift_report_path": "drift.json"},
        quantization={"model_sha256": "cd" * 32, "source_sha256": "ef" * 32},
        evaluation=ev, gate_result=to_jsonable(g), human=human or {},
        lineage={"dag_id": "d", "run_id": "r", "spec_sha256": "00"},
    )


def test_card_has_required_sections_and_values(tmp_path):
    card = _card({"intended_use": "Scoring demo."})
    res = write_card(card, tmp_path)
    md = open(res.markdown_path).read()
    for section in ("## Model details", "## Intended use", "## Quantization", "## Quantitative analyses",
                    "### Fairness", "## Gate results", "## Lineage", "base_model_relation: quantized"):
        assert section in md
    assert "version 3" in md and "per-channel" in md and "minmax" in md and "ab" * 32 in md
    assert "| 0.8000 | 0.7900 |" in md  # overall FP32 vs quantized
    assert "Scoring demo." in md
    assert "_[To be written by the model owner: set `card.limitations`" in md  # visible placeholder
    assert json.loads(open(res.json_path).read())["lineage"]["qops_version"]
    assert res.chart_path and open(res.chart_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_user_strings_are_escaped_in_markdown():
    md = render_markdown(_card())
    assert "<script>" not in md and "&lt;script&gt;" in md
