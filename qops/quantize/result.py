"""What every quantization engine returns (:class:`QuantizeResult`, one meaning of each field for ONNX Runtime,
torchao, QAT and decoder LLMs) and how its files are written: never over the source, under a temporary name
beside the output, then renamed into place with ``<output>.recipe.json``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qops import __version__
from qops.artifacts import atomic_path, clean_stale_temps, read_json, sha256_file, temp_prefix, write_json_atomic
from qops.errors import DataError, ModelError
from qops.quantize.graph import strip_debug_metadata

log = logging.getLogger(__name__)



@dataclass
class QuantizeResult:
    target: str
    model_path: str
    model_sha256: str
    recipe_path: str
    source_path: str
    source_sha256: str
    size_bytes: int
    source_size_bytes: int
    size_ratio: float  # output size / source size (0.25: four times smaller), as in evaluations
    calibration_path: str | None
    calibration_rows: int
    seconds: float
    recipe: dict = field(default_factory=dict)
    mode: str | None = None  # the mode actually used ("auto" resolved)
    graph_kind: str | None = None
    engine: str = "onnxruntime"
    model_report: dict = field(default_factory=dict)  # opset, upgrade, external data, ops left in FP32
    technique: dict = field(default_factory=dict)  # what the technique did (SmoothQuant, codebook, INT4...)
    notes: list = field(default_factory=list)
    trials: list = field(default_factory=list)  # accuracy-aware tuning: one row per candidate
    tuning: dict = field(default_factory=dict)
    passed: bool | None = None  # tuning: whether the written candidate passed the gates (None: not tuned)
    qat: dict = field(default_factory=dict)  # QAT: plan, training history, export check (empty for PTQ)
    engine_name: str | None = None  # the registered engine that wrote it (qops.engines)
    manifest: dict = field(default_factory=dict)  # {file: sha256} of the artifact, checked before registration


def check_output_path(model: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an ``output`` that is the source model itself (the same path, a symlink or a hard link of it): the
    FP32 source would be overwritten and the recipe would record source hash == model hash."""
    m, o = Path(model), Path(output)
    same = m.resolve() == o.resolve()
    if not same and o.exists() and m.exists():
        try:
            same = os.path.samefile(m, o)
        except OSError:
            same = False
    if same:
        raise DataError(f"--output {o} is the source model {m} itself (the same file{' via a link' if m != o else ''}): "
                        "quantizing would overwrite the FP32 model.",
                        "write the quantized model to another path, e.g. --output model.int8.onnx.")


@contextlib.contextmanager
def private_tempdir(folder: Path):
    """A temporary folder beside the output (``.qops-tmp-<pid>-*``), also used by ONNX Runtime's own temporary
    files while it is open (``tempfile.tempdir``), so a killed quantization leaves nothing in the system's TMPDIR
    and the next quantization into the same folder removes what it left."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in clean_stale_temps(folder):
        log.info("removed %s, left by a quantization that was killed", folder / name)
    td = Path(tempfile.mkdtemp(prefix=temp_prefix("quant-"), dir=folder))
    previous = tempfile.tempdir
    tempfile.tempdir = str(td)
    try:
        yield td
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(td, ignore_errors=True)


def publish(tmp: Path, output: Path, result_for, external: bool = False) -> QuantizeResult:
    """Put a finished model and its recipe in place as a pair: the recipe (naming the model's sha256) first, the
    model last, each by an atomic rename. A kill in between leaves a recipe whose hash does not match the model
    at ``output`` (or no model): :func:`verify_pair` tells, and no reader ever sees a model without its recipe.
    Models with external data are moved first (their data file is renamed before the model file)."""
    if external:
        move_model(tmp, output, external)
    result = result_for(output if external else tmp)
    write_recipe(result)
    if not external:
        os.replace(tmp, output)  # the temporary folder is beside the output: one file system
    return result


def write_recipe(result: QuantizeResult) -> None:
    """``<model>.recipe.json``: the recipe used and the result, with the model's sha256."""
    write_json_atomic(result.recipe_path, {"recipe": result.recipe, "result": result, "qops_version": __version__})


def verify_pair(model: str | os.PathLike) -> dict:
    """The recipe of ``model`` (``<model>.recipe.json``), checked to describe this very file (its sha256)."""
    m = Path(model)
    recipe = m.with_suffix(m.suffix + ".recipe.json")
    if not m.is_file() or not recipe.is_file():
        raise ModelError(f"{m} has no {'model' if not m.is_file() else 'recipe ' + recipe.name} beside it: the "
                         "quantization that wrote it did not finish.", "quantize again to the same output.")
    data = read_json(recipe)
    if data.get("result", {}).get("model_sha256") != sha256_file(m):
        raise ModelError(f"{recipe.name} does not describe {m.name} (sha256 differs): the quantization that wrote "
                         "them was interrupted between the two.", "quantize again to the same output.")
    return data


def move_model(tmp: Path, output: Path, external: bool) -> None:
    """Move the finished model into place: external data first, the model file last (atomic rename)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if external:
        import onnx

        m = onnx.load(str(tmp))  # loads external data from beside tmp
        with tempfile.TemporaryDirectory(prefix=".qops-", dir=output.parent) as staging:
            s = Path(staging) / output.name
            onnx.save(m, str(s), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=output.name + ".data", size_threshold=1024)
            os.replace(Path(staging) / (output.name + ".data"), output.parent / (output.name + ".data"))
            os.replace(s, output)
        return
    with atomic_path(output) as t:
        shutil.copyfile(tmp, t)


def copy_metadata(src: Path, dst: Path, external: bool = False) -> int:
    """Carry the source model's metadata_props (feature columns etc.) into the quantized model and drop the
    exporter's per-node debug metadata from it, in one load and save. Returns the debug bytes dropped."""
    import onnx

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst), load_external_data=False)
    have = {p.key for p in d.metadata_props}
    for p in s.metadata_props:
        if p.key not in have:
            e = d.metadata_props.add()
            e.key, e.value = p.key, p.value
    e = d.metadata_props.add()
    e.key, e.value = "qops.quantized_by", f"qops {__version__}"
    stripped = strip_debug_metadata(d)
    onnx.save(d, str(dst))  # external data references (locations) are kept as they are
    return stripped
