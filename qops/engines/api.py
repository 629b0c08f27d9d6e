"""The one quantize verb for every target: :func:`quantize` resolves the recipe, finds its engine
(:func:`~qops.engines.base.engine_for`), refuses a model or output the engine cannot take (exit 2 naming the fix)
before any work, and lets the engine write its artifact with ``<output>.recipe.json`` beside it. The CLI, the
pipeline's modalities and library users call the same verb.

A decoder target given a Hugging Face folder works alone, like ``optimum-cli`` or ``llama-quantize``: the
calibration texts (``--calibration``, a text column) are cut into windows with the folder's own tokenizer, the FP32
ONNX export (ONNX targets only) and the FP32 GGUF (GGUF targets) are made in a temporary folder beside the output."""

from __future__ import annotations

import os
from pathlib import Path

from qops.data.tables import read_table
from qops.engines.base import engine_for
from qops.engines.llm import LlmEngine, LlmInputs
from qops.engines.llm_tune import tune_llm
from qops.errors import DataError
from qops.llm.data import causal_lm_kind
from qops.llm.source import LlmInfo, check_hf_dir
from qops.quantize.api import resolve_recipe
from qops.quantize.result import QuantizeResult, check_output_path, private_tempdir, write_recipe
from qops.spec import GateSpec
from qops.spec.data import CausalLMSpec
from qops.targets import Recipe


def quantize(
    model: str | os.PathLike,
    target: str | Recipe,
    output: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    features: list[str] | None = None,
    batch_size: int = 64,
    options: dict | None = None,
    causal_lm: CausalLMSpec | None = None,
    tuning=None,
    gates=None,
) -> QuantizeResult:
    """Quantize an FP32 model for a hardware target; writes ``output`` and ``<output>.recipe.json``.

    ``model``: an ONNX graph, a ``.pt2`` program, or a Hugging Face causal-LM folder, as the target's engine takes.
    ``options`` override recipe fields (validated), e.g. ``{"calibration_method": "percentile"}``;
    ``causal_lm`` sets the text column and window length of decoder calibration (default: column ``text``,
    windows of 128 tokens). ``tuning`` (a :class:`~qops.spec.TuningSpec`) searches a decoder target's options,
    judged by ``gates`` (a causal-LM :class:`~qops.spec.GateSpec`) on held-out calibration documents
    (:mod:`qops.engines.llm_tune`); graph targets are tuned by :func:`qops.quantize.tune.tune`.
    """
    recipe = resolve_recipe(target, options)
    engine = engine_for(recipe)
    model, output = Path(model), Path(output)
    check_output_path(model, output)
    engine.check_io(recipe, model, output)
    if not isinstance(engine, LlmEngine):
        if tuning is not None:  # never silently ignored: graph targets are tuned against validation rows
            raise DataError(f"tuning= is for decoder targets; {recipe.target!r} is a graph target.",
                            "tune it with qops.quantize.tune.tune (qops quantize --tune --validation FILE).")
        return engine.quantize(model, recipe, output, calibration=calibration, features=features,
                               batch_size=batch_size)
    check_hf_dir(model)
    if (engine.needs_calibration(recipe) or tuning is not None) and calibration is None:
        why = "tuning scores its trials on held-out calibration documents" if tuning is not None \
            else recipe.calibration_use
        raise DataError(f"Target {recipe.target!r} ({why}) needs calibration texts.",
                        "pass --calibration FILE: parquet/CSV with a text column (--text-column, default 'text').")
    with private_tempdir(output.parent) as work:
        inputs = cli_inputs(model, work, calibration if engine.needs_calibration(recipe) or tuning else None,
                            causal_lm or CausalLMSpec())
        if tuning is not None:
            res = tune_llm(engine, model, recipe, output, inputs, tuning, gates or GateSpec(task="causal_lm"))
        else:
            res = engine.quantize(model, recipe, output, inputs=inputs)
    res.recipe_path = str(Path(str(output) + ".recipe.json"))
    write_recipe(res)
    return res


def cli_inputs(hf_dir: Path, work: Path, calibration, causal_lm: CausalLMSpec) -> LlmInputs:
    """A decoder engine's inputs outside a pipeline: the folder's windows of the calibration texts, the checkpoint
    as the reference, a work folder for the FP32 exports."""
    info = LlmInfo.from_hf(hf_dir)
    windows, rows = None, 0
    if calibration is not None:
        df = read_table(calibration, "calibration set")
        windows = causal_lm_kind(causal_lm, str(hf_dir), info).windows(df, "calibration set",
                                                                       causal_lm.calibration_windows)
        rows = len(df)
    return LlmInputs(hf_dir=hf_dir, info=info, work_dir=work, windows=windows,
                     calibration_path=str(calibration) if calibration is not None else None, calibration_rows=rows,
                     reference_is_checkpoint=True)
