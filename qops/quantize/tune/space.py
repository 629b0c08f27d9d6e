"""The search space of a recipe: calibration method x granularity (static INT8), granularity (dynamic), static
vs dynamic (``mode: auto``), SmoothQuant strengths, embedding granularity, INT4 algorithm and block size,
codebook kind; the default candidate first."""

from __future__ import annotations

import itertools

from qops.spec import TuningSpec
from qops.targets import Recipe


def search_space(recipe: Recipe, cfg: TuningSpec, has_calibration: bool, preferred_mode: str | None = None,
                 kind: str | None = None) -> list[dict]:
    """Recipe option sets to try, the recipe's own settings first (for ``mode: auto``, the mode the graph's
    structure picks first). Convolutional graphs (``kind``) try, by measured gain per second on a real mobile CNN:
    the default (integer graph + bias correction), then learned rounding, then exact cross-layer equalization, then
    the other calibration methods, and dynamic INT8 last (it leaves Convs in float)."""
    base: dict = {}
    cands: list[dict] = [base]
    if recipe.engine != "onnxruntime":
        return cands
    if recipe.precision == "int8":
        modes = cfg.modes or (["static", "dynamic"] if recipe.mode == "auto" else [recipe.mode])
        if recipe.mode == "auto":
            cands = []  # "recipe defaults" would repeat the first explicit candidate of the preferred mode
            if preferred_mode in modes:
                modes = [preferred_mode] + [m for m in modes if m != preferred_mode]
        if not has_calibration:
            modes = [m for m in modes if m != "static"] or ["dynamic"]
        gran = [g == "per-channel" for g in cfg.granularities]
        acts = cfg.activation_types or [recipe.activation_type]
        first = cfg.calibration_methods[:1]
        ops = [recipe.op_types] + ([()] if cfg.try_all_ops and recipe.op_types else [])
        attention = preferred_mode == "dynamic"  # choose_mode picks dynamic for attention/recurrent graphs
        egs = cfg.embedding_granularities or (["per-row"] if attention else [recipe.embedding_granularity])
        alphas = cfg.smooth_quant_alphas if cfg.smooth_quant_alphas is not None else (
            ["auto", 0.7] if attention else [])
        basic: dict[str, list] = {
            "static": [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                        "op_types": o, "embedding_granularity": eg}
                       for m in first for o, pc, act, eg in itertools.product(ops, gran, acts, egs)],
            "dynamic": [{"mode": "dynamic", "per_channel": pc, "op_types": o, "embedding_granularity": eg}
                        for o, pc, eg in itertools.product(ops, gran, egs)],
        }
        # breadth first: every mode's basic variants, then the other calibration methods, then SmoothQuant;
        # for attention graphs (activation outliers) SmoothQuant right after the first dynamic candidate
        if attention and has_calibration and "dynamic" in modes and alphas:
            cands += basic["dynamic"][:1] + [{"mode": "dynamic", "smooth_quant_alpha": a, "per_channel": True,
                                              "embedding_granularity": eg} for a in alphas for eg in egs]
        others = [{"mode": "static", "calibration_method": m, "per_channel": pc, "activation_type": act,
                   "op_types": o} for m in cfg.calibration_methods[1:]
                  for o, pc, act in itertools.product(ops, gran, acts)] if "static" in modes else []
        if kind == "convolutional" and "static" in modes:
            first_static = basic["static"][:1]
            cands += first_static + [dict(c, learned_rounding=True) for c in first_static]
            cands += [dict(c, equalization="exact") for c in first_static]  # Relu chains (none in ReLU6 nets)
            cands += [c for c in others if c.get("per_channel", True)] + basic["static"][1:]
            cands += [c for c in others if not c.get("per_channel", True)]
            cands += [c for m in modes if m != "static" for c in basic[m]]
            others = []
        else:
            for mode in modes:
                cands += basic[mode]
        cands += others
        if has_calibration:  # SmoothQuant measures activations on the calibration set, for either mode
            cands += [{"mode": m, "smooth_quant_alpha": a, "per_channel": True, "embedding_granularity": eg}
                      for m in modes for a in alphas for eg in egs]
    elif recipe.precision == "int4":
        for algo, block in itertools.product(["rtn"] + (["awq", "gptq"] if has_calibration else []), [128, 32]):
            cands.append({"algorithm": algo, "block_size": block})
    elif recipe.precision == "codebook":
        cands += [{"codebook": "kmeans"}, {"codebook": "pow2"}]
    # drop option sets equal to the recipe itself (the first candidate) and duplicates
    seen, out = set(), []
    for c in cands:
        eff = tuple(sorted({k: v for k, v in c.items() if getattr(recipe, k) != v}.items()))
        if eff not in seen:
            seen.add(eff)
            out.append(dict(eff))
    return out


def candidate_label(opts: dict) -> str:
    if not opts:
        return "recipe defaults"
    parts = []
    for k, v in opts.items():
        if k == "nodes_to_exclude":
            parts.append(f"{len(v)} node(s) kept out")  # FP32, INT16 weights or INT8: technique.precision
        elif k == "per_channel":
            parts.append("per-channel" if v else "per-tensor")
        elif k == "op_types":
            parts.append("all ops" if not v else "ops " + "/".join(v))
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)
