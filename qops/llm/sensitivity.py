"""Per-layer sensitivity of a decoder to 4-bit weights, as an artifact: each decoder layer's Linear weights are
rounded to the recipe's 4-bit grid (symmetric, groups of ``block_size``) alone, the others kept in FP32, and the
mean KL(FP32 || that model) of the next-token distributions on calibration windows is that layer's cost. The most
costly layers are written as a versioned override file (``qops_tensor_overrides``: 1) that a recipe accepts
(``tensor_overrides``), as llama.cpp's ``--tensor-type-file``: those layers stay 8-bit, the rest 4-bit (mixed
INT4/INT8). The card lists the costs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from qops.artifacts import write_json_atomic
from qops.errors import DataError
from qops.llm.torch_quant import decoder_layers, fake_quant, qparams

VERSION = 1


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def layer_sensitivity(hf_dir: str | os.PathLike, windows, block_size: int, keep: int = 4, progress=None) -> dict:
    """The override document: every layer's KL cost and the ``keep`` costliest layers overridden to int8."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()

    def logits():
        with torch.inference_mode():
            return [_log_softmax(model(input_ids=torch.as_tensor(np.asarray(w.ids))[None]).logits[0].numpy())
                    for w in windows]

    ref = logits()
    costs = {}
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        lins = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.weight.detach().clone() for m in lins]
        with torch.no_grad():
            for m in lins:
                group = block_size if m.in_features % block_size == 0 else None
                scale, qmin, qmax = qparams(m.weight, 4, group)
                m.weight.copy_(fake_quant(m.weight, scale, qmin, qmax, group))
        got = logits()
        costs[f"layers.{i}"] = float(np.mean([(np.exp(a) * (a - b)).sum(-1).mean() for a, b in zip(ref, got)]))
        with torch.no_grad():
            for m, w in zip(lins, saved):
                m.weight.copy_(w)
        if progress:
            progress(i + 1, len(layers))
    ranked = sorted(costs, key=costs.get, reverse=True)
    return {"qops_tensor_overrides": VERSION, "metric": "mean KL(FP32 || one layer 4-bit) of the next-token "
            f"distributions, nats, on {len(windows)} calibration windows", "block_size": block_size,
            "layers": {k: {"kl": round(costs[k], 6), "rank": ranked.index(k) + 1} for k in costs},
            "overrides": {k: "int8" for k in ranked[:keep]}, "seconds": round(time.perf_counter() - t0, 1)}


def write_overrides(doc: dict, path: str | os.PathLike) -> Path:
    out = Path(path)
    write_json_atomic(out, doc)
    return out


def read_overrides(path: str | os.PathLike) -> dict:
    """A tensor-override file, checked: its version, and that every override is a layer and a precision qops
    writes."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"Tensor-override file {p} cannot be read: {e}.",
                        "write it with `qops sensitivity` (docs/llm.md#sensitivity).") from None
    if doc.get("qops_tensor_overrides") != VERSION:
        raise DataError(f"{p} is not a version-{VERSION} qops tensor-override file "
                        f"(qops_tensor_overrides: {doc.get('qops_tensor_overrides')!r}).",
                        "write it again with this qops' `qops sensitivity`.")
    bad = {k: v for k, v in (doc.get("overrides") or {}).items() if not k.startswith("layers.") or v != "int8"}
    if bad:
        raise DataError(f"{p} overrides {bad}: qops reads `layers.N: int8` entries.",
                        "keep only decoder layers overridden to int8.")
    return doc


def override_nodes(doc: dict, node_names) -> list[str]:
    """The ONNX MatMul nodes of the overridden decoder layers (ONNX Runtime GenAI's export names them
    ``/model/layers.N/...``)."""
    layers = [f"/model/{k}/" for k in doc.get("overrides", {})]
    return [n for n in node_names if any(n.startswith(prefix) for prefix in layers)]
