"""The pipeline spec: one YAML file, validated by typed models, the single source of truth.

The CLI (`qops run spec.yaml`) runs it, the Airflow DAG factory builds the DAG from it, and the
model card quotes it. Strings may use ``${VAR}`` or ``${VAR:-default}``; relative paths are
resolved against the folder of the spec file.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from qops.errors import SpecError
from qops.spec.base import Base, expand_tree, expand_vars, is_remote, resolve_path
from qops.spec.calibration import CalibrationSpec, DiversitySpec, DriftSpec, RecencySpec
from qops.spec.data import CausalLMSpec, DataSpec, ImageSpec, TensorsSpec, TextSpec
from qops.spec.gates import GateSpec, InconclusiveSpec, MetricThreshold
from qops.spec.pipeline import CardSpec, MlflowSpec, PipelineSpec, PromotionSpec, StorageSpec, WatchSpec
from qops.spec.training import QatSpec, QatTargetSpec, QloraSpec, TuningSpec


def _resolve_paths(spec: PipelineSpec, base: Path) -> PipelineSpec:
    def fix(p: str) -> str:
        return resolve_path(p, base)

    d = spec.data
    d.pool, d.reference, d.validation = fix(d.pool), fix(d.reference), fix(d.validation)
    if d.text is not None:
        d.text.tokenizer = fix(d.text.tokenizer) if d.text.tokenizer.startswith((".", "/", "~")) or (
            base / d.text.tokenizer).exists() else d.text.tokenizer  # a hub-like name stays as given: an error later
    if d.image is not None:
        d.image.root = fix(d.image.root or ".")
    if d.causal_lm is not None and d.causal_lm.tokenizer:
        d.causal_lm.tokenizer = fix(d.causal_lm.tokenizer)
    if spec.qlora is not None and spec.qlora.data:
        spec.qlora.data = fix(spec.qlora.data)
    if spec.qat is not None:
        spec.qat.data = fix(spec.qat.data) if spec.qat.data else None
        spec.qat.program = fix(spec.qat.program) if spec.qat.program else None
    spec.artifact_root = fix(spec.artifact_root)
    spec.source_model = fix(spec.source_model)
    return spec


def parse_spec(raw: dict, base_dir: str | os.PathLike = ".") -> PipelineSpec:
    try:
        spec = PipelineSpec.model_validate(raw)  # an unknown target raises TargetError, unwrapped
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise SpecError("The pipeline spec is invalid:\n" + "\n".join(lines), "correct the fields listed.") from None
    return _resolve_paths(spec, Path(base_dir))


def read_spec_file(path: str | os.PathLike) -> tuple[dict, Path]:
    """The spec file's mapping, ``${VAR}`` expanded, and the folder its relative paths resolve against."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"Spec file {p} does not exist.", "pass the path of a pipeline spec YAML file.")
    try:
        raw = expand_tree(yaml.safe_load(p.read_text(encoding="utf-8")))
    except yaml.YAMLError as e:
        raise SpecError(f"Spec file {p} is not valid YAML: {e}", "fix the YAML syntax.") from None
    if not isinstance(raw, dict):
        raise SpecError(f"Spec file {p} must hold a mapping at the top level.", "see docs/spec.md.")
    return raw, p.parent.resolve()


def load_spec(path: str | os.PathLike) -> PipelineSpec:
    """The loader every entry point uses (``qops run``, ``qops stage``, the DAG factory)."""
    raw, base = read_spec_file(path)
    return parse_spec(raw, base)


def json_schema() -> dict:
    """The JSON Schema of the pipeline spec (``qops spec schema``; committed as docs/spec.schema.json). Target
    names and their recipe options are not enumerated: targets come from a registry that plugins extend
    (``qops spec validate`` checks them)."""
    schema = PipelineSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "qops pipeline spec",
            "description": "One YAML file drives `qops run`, the Airflow DAG and the model card (docs/spec.md).",
            **{k: v for k, v in schema.items() if k not in ("title", "description")}}


__all__ = ["Base", "CalibrationSpec", "CardSpec", "CausalLMSpec", "DataSpec", "DiversitySpec", "DriftSpec", "GateSpec", "ImageSpec", "InconclusiveSpec", "MetricThreshold", "MlflowSpec", "PipelineSpec", "PromotionSpec", "QatSpec", "QatTargetSpec", "QloraSpec", "RecencySpec", "StorageSpec", "TensorsSpec", "TextSpec", "TuningSpec", "WatchSpec", "expand_tree", "expand_vars", "is_remote", "json_schema", "load_spec", "parse_spec", "read_spec_file", "resolve_path"]
