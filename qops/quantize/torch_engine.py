"""Quantization for PyTorch serving, through torchao (never ``torch.ao.quantization``, deprecated in torch 2.13).

Input and output are ``torch.export`` programs (``.pt2``): no pickled modules are loaded. Two paths:

- ``pt2e_x86_inductor``: PT2E static quantization — ``prepare_pt2e`` with torchao's ``X86InductorQuantizer``,
  calibration on the calibration set, ``convert_pt2e``; served through ``torch.compile`` (Inductor lowers the
  Q/DQ patterns to oneDNN INT8 kernels, VNNI/AMX).
- ``quantize_`` configs (``int8_dynamic``, ``int8_weight_only``, ``int4_weight_only``, ``float8_dynamic``):
  the exported graph's ``aten.linear`` calls are turned back into ``nn.Linear`` modules, ``quantize_`` swaps
  their weights for torchao tensor subclasses, and the result is exported again.

The feature columns travel in the archive's ``extra_files`` (``qops.json``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from qops import __version__
from qops.artifacts import sha256_file, write_json_atomic
from qops.data import read_table
from qops.errors import DataError, ModelError, TargetError
from qops.programs import export_module, load_program, program_inputs, retarget_devices
from qops.quantize.result import QuantizeResult
from qops.targets import Recipe

log = logging.getLogger(__name__)

def require_torch_runtime(recipe: Recipe) -> None:
    """Raise a TargetError naming what to install or which queue to use when this worker cannot run ``recipe``."""
    try:
        import torch
    except ImportError:
        raise TargetError(f"Target {recipe.target!r} needs PyTorch, which this worker lacks.",
                          "install qops with its pinned dependencies (pip install -c constraints.txt qops: "
                          "torch==2.13.0, torchao==0.18.0).") from None
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise TargetError(f"Target {recipe.target!r} needs torchao, which this worker lacks.",
                          "install torchao==0.18.0 (a dependency of qops: pip install -c constraints.txt qops).") from None
    if recipe.device == "cuda":
        if not torch.cuda.is_available():
            raise TargetError(
                f"Target {recipe.target!r} runs on an NVIDIA GPU ({recipe.hardware}) but this worker has no CUDA "
                f"device (torch {torch.__version__}).",
                f"route the task to the '{recipe.queue}' queue (a GPU worker with a CUDA build of torch).")
        cap = torch.cuda.get_device_capability()
        if recipe.min_compute_capability and tuple(cap) < tuple(recipe.min_compute_capability):
            need = ".".join(map(str, recipe.min_compute_capability))
            raise TargetError(
                f"Target {recipe.target!r} needs compute capability >= {need}; this worker's "
                f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}.",
                f"route it to GPUs of the target's kind ({recipe.hardware}) or pick nvidia_fp16.")


def linear_modules(gm) -> int:
    """Turn ``aten.linear(x, W, b)`` calls on parameters of an exported GraphModule into ``nn.Linear``
    submodules, so that ``quantize_`` (which swaps ``nn.Linear`` weights) applies. Returns how many."""
    import torch

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[:3]
        if getattr(w, "op", None) != "get_attr" or (b is not None and getattr(b, "op", None) != "get_attr"):
            continue
        weight = gm.get_parameter(w.target) if w.target in dict(gm.named_parameters()) else getattr(gm, w.target)
        bias = None if b is None else (gm.get_parameter(b.target) if b.target in dict(gm.named_parameters())
                                       else getattr(gm, b.target))
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        name = f"qops_linear_{count}"
        gm.add_module(name, lin)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


def drop_unused_tensors(gm) -> int:
    """Delete parameters/buffers no graph node reads (the FP32 weights that PT2E folded into INT8 constants),
    so the exported archive does not carry both."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    dropped = 0
    for name in names:
        if name in used:
            continue
        parent, _, attr = name.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        delattr(owner, attr)
        dropped += 1
    gm.recompile()
    return dropped


def torchao_config(method: str, block_size: int = 128):
    """The torchao config of a recipe's ``torch_method`` (the one map from qops' method names to torchao's configs;
    ``block_size``: the group size of ``int4_weight_only``)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {
        "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int8_weight_only": lambda: Int8WeightOnlyConfig(),
        "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=block_size),
        "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }[method]()


def _table_batches(calibration, features: list[str], batch_size: int, dtype=np.float32):
    df = read_table(calibration, "calibration set")
    missing = [c for c in features if c not in df.columns]
    if missing:
        raise DataError(f"The calibration set {calibration} lacks feature column(s) {missing}.",
                        "select the calibration set from data with the model's features.")
    x = df[features].to_numpy(dtype)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"The calibration set {calibration} has NaN/inf features.", "impute or drop those rows.")
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)], len(x)


def quantize_torch(model, recipe: Recipe, output, calibration=None, features=None, batch_size: int = 64):
    """Quantize a ``.pt2`` program with torchao for ``recipe``; writes ``output`` (.pt2) and its recipe JSON."""
    model, output = Path(model), Path(output)
    if not model.is_file():
        raise ModelError(f"Model file {model} does not exist.", "pass the path of an FP32 .pt2 program.")
    if model.suffix.lower() != ".pt2":
        raise ModelError(
            f"Target {recipe.target!r} quantizes PyTorch programs (torch.export .pt2), not {model.name}.",
            "register the FP32 model with mlflow.pytorch.log_model(serialization_format='pt2') or pass a .pt2 "
            "file; for an ONNX model pick an ONNX Runtime target (qops targets).")
    require_torch_runtime(recipe)
    import torch

    t0 = time.perf_counter()
    ep, meta = load_program(model)
    inputs = program_inputs(ep)
    if len(inputs) != 1 or len(inputs[0][1]) != 2:
        raise ModelError(f"{model.name} has inputs {inputs}; qops feeds tabular data to one [batch, n] input.",
                         "export the model with one [batch, n_features] float input.")
    feats = list(features or [c for c in meta.get("qops.feature_columns", "").split(",") if c])
    width = inputs[0][1][1]
    if not feats:
        raise DataError(f"No feature columns given and {model.name} carries none.",
                        "list them under data.features (or --features).")
    if width is not None and width != len(feats):
        raise DataError(f"The model input expects {width} features but {len(feats)} feature columns were given.",
                        "pass the feature columns the model was trained on, in training order.")
    device = torch.device(recipe.device)
    in_dtype = getattr(torch, inputs[0][2])
    example = torch.zeros(2, len(feats), dtype=in_dtype)
    rows = 0
    technique: dict = {"kind": recipe.torch_method, "engine": "torchao"}
    with torch.no_grad():
        if recipe.torch_method == "pt2e_x86_inductor":
            if calibration is None:
                raise DataError(f"Target {recipe.target!r} uses PT2E static quantization, which needs a calibration set.",
                                "pass --calibration FILE (parquet/CSV with the model's feature columns).")
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
                is_dynamic=False, reduce_range=recipe.reduce_range))
            batches, rows = _table_batches(calibration, feats, batch_size, np.dtype(inputs[0][2]))
            if rows == 0:
                raise DataError(f"The calibration set {calibration} has no rows.", "select a non-empty calibration set.")
            prepared = prepare_pt2e(ep.module(), quantizer)
            log.info("PT2E calibration for %s on %d rows", recipe.target, rows)
            for b in batches:
                prepared(torch.from_numpy(b))
            qmodule = convert_pt2e(prepared, fold_quantize=True)
            technique["fp32_tensors_dropped"] = drop_unused_tensors(qmodule)
            technique["quantizer"] = "X86InductorQuantizer (static, u8 activations, s8 per-channel weights)"
        else:
            gm = ep.module()
            n = linear_modules(gm)
            if n == 0:
                raise ModelError(f"{model.name} has no linear layers for torchao's quantize_.",
                                 "pick torch_x86_int8 (PT2E) or an ONNX Runtime target.")
            from torchao.quantization import quantize_

            dtype = torch.bfloat16 if recipe.precision == "fp8" or recipe.torch_method == "int4_weight_only" else None
            gm = gm.to(device=device, dtype=dtype) if dtype else gm.to(device)
            retarget_devices(gm, device)
            skipped: list[str] = []

            def eligible(mod, fqn: str) -> bool:
                if not isinstance(mod, torch.nn.Linear):
                    return False
                # GPU INT8/FP8 matmul kernels need dimensions that are multiples of 16: leave others in high precision
                if device.type == "cuda" and (mod.in_features % 16 or mod.out_features % 16):
                    skipped.append(f"{fqn} ({mod.in_features}x{mod.out_features})")
                    return False
                return True

            config = torchao_config(recipe.torch_method, recipe.block_size)
            try:
                quantize_(gm, config, filter_fn=eligible)
            except ImportError as e:
                raise TargetError(f"Target {recipe.target!r} ({recipe.torch_method}) needs a kernel package this "
                                  f"worker lacks: {e}.",
                                  "install it on the worker (torchao's INT4 CUDA kernels come from the 'mslk'/"
                                  "fbgemm-gpu-genai packages), or pick int8_weight_only / float8_dynamic.") from None
            technique["linear_layers_kept_high_precision"] = skipped
            qmodule = gm
            example = example.to(device=device, dtype=dtype) if dtype and example.is_floating_point() \
                else example.to(device)
            technique.update(linear_layers=n, config=type(config).__name__,
                             compute_dtype=str(dtype or torch.float32).replace("torch.", ""))
        out_meta = dict(meta, **{"qops.feature_columns": ",".join(feats), "qops.quantized_by": f"qops {__version__}",
                                 "qops.target": recipe.target, "qops.device": recipe.device,
                                 "qops.torch_compile": recipe.torch_compile})
        export_module(qmodule, example, out_meta, output)
    recipe_path = output.with_suffix(output.suffix + ".recipe.json")
    src, out = model.stat().st_size, output.stat().st_size
    result = QuantizeResult(
        target=recipe.target, model_path=str(output), model_sha256=sha256_file(output), recipe_path=str(recipe_path),
        source_path=str(model), source_sha256=sha256_file(model), size_bytes=out, source_size_bytes=src,
        size_ratio=round(out / src, 4), calibration_path=str(calibration) if rows else None, calibration_rows=rows,
        seconds=round(time.perf_counter() - t0, 3), recipe=recipe.to_dict(), mode=recipe.mode, graph_kind=None,
        engine="torchao", engine_name="torchao", technique=technique,
        notes=["served through torch.compile (Inductor)"] if recipe.torch_compile else [],
    )
    write_json_atomic(recipe_path, {"recipe": recipe.to_dict(), "result": result, "qops_version": __version__})
    return result


def export_fp32(module, features: list[str], path: str | os.PathLike, dtype=None) -> Path:
    """Save an FP32 ``nn.Module`` taking ``[batch, len(features)]`` (float, or ``dtype`` e.g. ``torch.long`` for
    token ids) as a ``.pt2`` program with its feature columns."""
    import torch

    module = module.eval()
    example = torch.zeros(2, len(features), dtype=dtype or torch.float32)
    with torch.no_grad():
        return export_module(module, example, {"qops.feature_columns": ",".join(features)}, path)
