import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from qops.cards import build_card_data, render_html, render_markdown, validate_card, write_card
from qops.errors import QopsError


def test_card_files_sections_and_values(card_inputs, tmp_path):
    card = build_card_data(**card_inputs)
    res = write_card(card, tmp_path)
    md = Path(res.markdown_path).read_text()
    for section in ("## Model details", "## Intended use", "## Factors", "## Metrics", "## Evaluation data",
                    "## Training data", "## Quantitative analyses", "### Fairness", "## Quantization",
                    "## Gate results", "## Ethical considerations", "## Caveats and recommendations", "## Lineage"):
        assert section in md
    assert "version 3" in md and "per-channel" in md and "ab" * 32 in md and "95% CI" in md
    assert "[To be written by the model owner: set card.training_data" in md  # visible placeholder
    assert "not on the target's aarch64 hardware" in md  # arm64 target measured on an x86 worker
    assert "onnxruntime 1." in md  # library versions
    assert "| Weight precision per layer | int8 per-channel x" in md  # the per-layer precision map
    assert "`s3://pools/p.parquet` etag `" + "e" * 32 + "`" in md and "`/data/train.parquet`, 20 bytes" in md
    assert json.loads(Path(res.json_path).read_text()) == card
    assert Path(res.chart_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_front_matter_is_hugging_face_compatible(card_inputs):
    md = render_markdown(build_card_data(**card_inputs))
    meta = yaml.safe_load(md.split("---\n")[1])
    assert meta["base_model"] == "models:/m@champion" and meta["base_model_relation"] == "quantized"
    results = meta["model-index"][0]["results"][0]
    assert {m["type"] for m in results["metrics"]} >= {"accuracy", "f1", "roc_auc"}
    assert all(isinstance(m["value"], float) for m in results["metrics"])


def test_user_strings_are_escaped(card_inputs):
    card = build_card_data(**card_inputs)
    md, html = render_markdown(card), render_html(card)
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "<script" not in html and "&lt;script&gt;" in html and "&lt;b&gt;tests&lt;/b&gt;" in html


def test_schema_validates_and_rejects(card_inputs):
    card = build_card_data(**card_inputs)
    validate_card(card)
    broken = json.loads(json.dumps(card))
    broken["quantization"]["granularity"] = "per-galaxy"
    with pytest.raises(QopsError, match="quantization/granularity"):
        validate_card(broken)


def test_same_inputs_give_the_same_card(card_inputs, tmp_path):
    a, b = build_card_data(**card_inputs), build_card_data(**card_inputs)
    assert a == b
    ra, rb = write_card(a, tmp_path / "a"), write_card(b, tmp_path / "b")
    for name in ("markdown_path", "html_path", "json_path", "chart_path"):
        assert Path(getattr(ra, name)).read_bytes() == Path(getattr(rb, name)).read_bytes(), name
    c = build_card_data(**{**card_inputs, "generated_at": None})
    assert {k: v for k, v in c.items() if k != "generated_at"} == {k: v for k, v in a.items() if k != "generated_at"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_card_renders_in_a_real_browser(card_inputs, tmp_path):
    card = build_card_data(**card_inputs)
    res = write_card(card, tmp_path)
    url = Path(res.html_path).resolve().as_uri()
    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n_rows = 1 + len(card["quantitative_analyses"]["slices"])
    assert html.count('class="bar bar-fp32"') == n_rows and html.count('class="bar bar-quantized"') == n_rows
    assert html.count('class="whisker"') >= 1 and html.count('class="bar bar-perf"') == 4
    assert "<title>Model card: m (arm64_int8)</title>" in html  # the script did not run
    assert "<script" not in html and "&lt;script&gt;document.title" in html  # shown as text
    shot = tmp_path / "card.png"
    r = _chromium("--window-size=1100,1800", f"--screenshot={shot}", url)
    assert r.returncode == 0 and shot.stat().st_size > 20_000


def test_card_shows_three_way_decisions_and_what_slices_can_protect(card_inputs):
    card = build_card_data(**card_inputs)
    md, html = render_markdown(card), render_html(card)
    g = card["gates"]
    assert g["multiplicity"]["method"] == "holm" and f"one family of {g['multiplicity']['family_size']}" in md
    assert "### What the slices can and cannot protect" in md
    for u in g["unprotected"]:  # 200 validation rows: slices under 125 rows cannot protect a 0.03 tolerance
        assert u["n"] < u["rows_needed"] and f"| {u['n']} | {u['tolerance']} |" in md
    assert any(c["status"] == "inconclusive" for c in g["checks"]) == bool(g["inconclusive"])
    rows = [c for c in g["checks"] if c.get("interval") and c["name"].startswith(("drop[", "slice_drop[",
                                                                                   "fairness_increase["))]
    assert html.count('class="gate-row"') == len(rows) > 0  # the gate chart: one interval per change check
    for c in rows:
        assert f'data-status="{c["status"]}"' in html


def test_card_shows_equalization_fine_tuning_and_layers_kept_out_of_int8(card_inputs):
    import copy

    inputs = copy.deepcopy(card_inputs)
    t = inputs["quantization"]["technique"]
    t["precision"] = {"/conv1": "int8 per-channel", "/dw<1>": "int16 per-channel"}
    t["precision_summary"] = {"int8 per-channel": 1, "int16 per-channel": 1}
    t["equalization"] = {"mode": "exact", "chains": 3, "channels_scaled": 40, "channels": 64}
    t["finetune"] = {"steps": 120, "kept_step": 100, "train_rows": 400, "held_out_rows": 100, "stopped": "steps done",
                     "held_out_before": {"loss": 0.2, "agreement": 0.9, "cosine": 0.99},
                     "held_out_after": {"loss": 0.1, "agreement": 0.95, "cosine": 0.995}}
    card = build_card_data(**inputs)
    md, html = render_markdown(card), render_html(card)
    assert "| Weight precision per layer | int8 per-channel x1, int16 per-channel x1 — not INT8: /dw&lt;1&gt; (int16" in md
    assert "| Cross-layer equalization | exact: 40 of 64 channels in 3 chains scaled |" in md
    assert "kept step 100: held-out agreement 0.900 → 0.950, cosine 0.9900 → 0.9950 on 100 held-out rows" in md
    assert "/dw&lt;1&gt; (int16 per-channel)" in html and "Quantization-aware fine-tuning" in html
