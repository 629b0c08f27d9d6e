"""The engine registry: one :class:`Engine` per artifact format, registered once by name (as torchao registers a
handler per config type). An engine owns what later stages used to guess from file suffixes: which inputs it takes
(an ONNX graph, a ``.pt2`` program, a Hugging Face folder), whether it needs calibration, its artifact layout (one
file with a suffix, or a checkpoint folder), how big the artifact is and what its digest is (a manifest of file
digests for folders), and which recipes are its own.

Where an engine plugs in: write a subclass, decorate it with :func:`register_engine`, and make
:meth:`Engine.accepts` claim the recipes it serves; :func:`engine_for` then routes every target of that kind to it
from the CLI, the pipeline and the registry alike."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, ClassVar

from qops.artifacts import sha256_file
from qops.errors import DataError, ModelError, TargetError
from qops.targets import Recipe

# what a model path is, by what is on disk (the only place a model input's kind is read off a path)
ONNX, PT2, HF_FOLDER, GGUF = "onnx", "pt2", "hf_folder", "gguf"
INPUT_WORDS = {ONNX: "an ONNX graph (.onnx)", PT2: "a PyTorch program (.pt2)",
               HF_FOLDER: "a Hugging Face checkpoint folder (config.json + weights)", GGUF: "a GGUF file (.gguf)"}
# weight files of a checkpoint folder or an ONNX model (what the size of an artifact counts)
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".gguf", ".pt2")


def input_kind(path: str | os.PathLike) -> str | None:
    """The kind of model at ``path``, or None when it is none qops reads."""
    p = Path(path)
    if p.is_dir():
        return HF_FOLDER if (p / "config.json").is_file() else None
    return {".onnx": ONNX, ".pt2": PT2, ".gguf": GGUF}.get(p.suffix.lower())


def file_manifest(path: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} of every file of a folder (or of the one file), the integrity record of an
    artifact: recorded when it is written, recomputed before it is registered."""
    p = Path(path)
    if p.is_file():
        return {p.name: sha256_file(p)}
    return {f.relative_to(p).as_posix(): sha256_file(f) for f in sorted(x for x in p.rglob("*") if x.is_file())}


def manifest_digest(manifest: dict[str, str], single_file: bool) -> str:
    """The artifact's digest from its manifest: a single file's own sha256, a folder's sha256 over its sorted
    (path, sha256) pairs."""
    if single_file:
        return next(iter(manifest.values()))
    h = hashlib.sha256()
    for name in sorted(manifest):
        h.update(name.encode())
        h.update(manifest[name].encode())
    return h.hexdigest()


def changed_files(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Files added, removed or changed between two manifests (sorted)."""
    return sorted(n for n in set(recorded) | set(actual) if recorded.get(n) != actual.get(n))


class Engine:
    """One artifact format and the library that writes it. Subclasses set the class attributes and implement
    :meth:`accepts` and :meth:`quantize`."""

    name: ClassVar[str]
    library: ClassVar[str]  # the library that writes the artifact
    inputs: ClassVar[tuple[str, ...]]  # input kinds (ONNX, PT2, HF_FOLDER, GGUF)
    artifact: ClassVar[str]  # "file" or "folder"
    suffix: ClassVar[str] = ""  # the artifact file's suffix ("" for folders)
    primary: ClassVar[str | None] = None  # folder engines whose model is one file inside: its name
    flavor: ClassVar[str]  # MLflow flavor the registration logs it with

    @classmethod
    def accepts(cls, recipe) -> bool:
        raise NotImplementedError

    def needs_calibration(self, recipe) -> bool:
        return recipe.needs_calibration

    # ---- the artifact -------------------------------------------------------------------------------------------
    def model_file(self, output: Path) -> Path:
        """Where the model lands for an ``--output`` path: the output itself, or the primary file in the folder."""
        return output / self.primary if self.primary else output

    def size(self, path: str | os.PathLike) -> int:
        """Bytes of the artifact's weights (a folder's weight files; an ONNX file with its external data)."""
        p = Path(path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        data = p.with_name(p.name + ".data")
        return p.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    def manifest(self, path: str | os.PathLike) -> dict[str, str]:
        return file_manifest(path)

    def digest(self, path: str | os.PathLike) -> str:
        return manifest_digest(self.manifest(path), Path(path).is_file())

    # ---- checks before any work ---------------------------------------------------------------------------------
    def check_io(self, recipe, model: Path, output: Path) -> str:
        """Refuse a model or an output this engine cannot take (exit 2 naming the fix); returns the input kind."""
        kind = input_kind(model)
        if not model.exists():
            raise ModelError(f"Model {model} does not exist.", "pass the path of the FP32 model to quantize.")
        if kind not in self.inputs:
            have = INPUT_WORDS.get(kind, f"{model.name} (not a model qops reads)")
            takes = " or ".join(INPUT_WORDS[k] for k in self.inputs)
            raise TargetError(
                f"Target {recipe.target!r} ({self.library}) quantizes {takes}, not {have}.",
                f"pass {takes} as --model, or pick a target for {have} (qops targets: "
                + ("llm_*, gguf_*, ct_*, hf_bnb_* for decoder checkpoints" if kind in (HF_FOLDER, GGUF)
                   else "graph targets such as x86_64_vnni_int8 for ONNX graphs") + ").")
        if self.artifact == "file" and output.suffix.lower() != self.suffix:
            raise DataError(f"Target {recipe.target!r} writes {self.library} {self.suffix} files, but --output "
                            f"{output} ends in {output.suffix or 'no suffix'!r}.",
                            f"name the output with {self.suffix}, e.g. --output {output.with_suffix(self.suffix).name}.")
        if self.artifact == "folder" and (output.suffix.lower() in (".onnx", ".gguf", ".pt2") or output.is_file()):
            raise DataError(f"Target {recipe.target!r} writes a folder ({self.library}), but --output {output} "
                            "names a file.", f"pass a folder path, e.g. --output {output.with_suffix('')}.")
        return kind

    def quantize(self, model: Path, recipe, output: Path, **kw):
        raise NotImplementedError


_ENGINES: dict[str, Engine] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: register an engine (once per name)."""
    if cls.name in _ENGINES and type(_ENGINES[cls.name]) is not cls:
        raise TargetError(f"Engine {cls.name!r} is registered twice.", "give the new engine another name.")
    _ENGINES[cls.name] = cls()
    return cls


def engines() -> dict[str, Engine]:
    return dict(_ENGINES)


def engine_named(name: str) -> Engine:
    if name not in _ENGINES:
        raise TargetError(f"Unknown engine {name!r}.", f"use one of {sorted(_ENGINES)}.")
    return _ENGINES[name]


def engine_for(recipe) -> Engine:
    """The engine that serves ``recipe`` (exactly one claims it)."""
    found = [e for e in _ENGINES.values() if e.accepts(recipe)]
    if len(found) != 1:
        raise TargetError(f"Target {recipe.target!r} (engine {recipe.engine!r}, precision {recipe.precision!r}, "
                          f"model_kind {recipe.model_kind!r}) is served by {len(found)} engines "
                          f"({', '.join(e.name for e in found) or 'none'}).",
                          "register exactly one engine whose accepts() claims it (qops.engines.register_engine).")
    return found[0]


def engine_of_result(result: dict) -> Engine:
    """The engine that wrote a recorded quantize result (``quantize.json``): by the name it recorded, else (results
    written before engines were recorded) by its recipe."""
    if result.get("engine_name"):
        return engine_named(result["engine_name"])
    return engine_for(Recipe.from_dict(result["recipe"]))


Progress = Callable[[int, int], None]
