"""``image``: image paths preprocessed with Pillow (resize, centre crop, mean/std, NCHW or NHWC)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qops.data.kinds.base import DataKind, check_feed
from qops.data.tables import require_columns
from qops.errors import DataError


class Image(DataKind):
    """Image files (a path column, relative to ``root``) preprocessed like torchvision's eval transform."""

    kind = "image"

    def __init__(self, path_column: str = "path", root: str | None = None, resize: int | None = 256,
                 crop: int | None = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 layout: str = "NCHW", input: str | None = None, scale: float = 1 / 255):
        if layout not in ("NCHW", "NHWC"):
            raise DataError(f"data.image.layout {layout!r} is not NCHW or NHWC.", "use NCHW (PyTorch) or NHWC.")
        self.path_column, self.root = path_column, root
        self.resize, self.crop, self.layout, self.input, self.scale = resize, crop, layout, input, scale
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def columns(self):
        return [self.path_column]

    def _path(self, p) -> Path:
        path = Path(str(p))
        return path if path.is_absolute() or not self.root else Path(self.root) / path

    def _load(self, p):
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError

        path = self._path(p)
        try:
            with PILImage.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"Image {path} does not exist.", f"fix the paths in column {self.path_column!r} "
                            "(relative paths are read from data.image.root).") from None
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"Image {path} cannot be read: {e}", "remove or replace the file.") from None

    def _pixels(self, im) -> np.ndarray:
        from PIL import Image as PILImage

        if self.resize:
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), PILImage.BILINEAR)
        if self.crop:
            w, h = im.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            im = im.crop((left, top, left + self.crop, top + self.crop))
        x = (np.asarray(im, dtype=np.float32) * self.scale - self.mean) / self.std  # HWC
        return x if self.layout == "NHWC" else x.transpose(2, 0, 1)

    def feeds(self, df, inputs, what):
        require_columns(df, [self.path_column], what)
        name = self.input or (inputs[0].name if len(inputs) == 1 else None)
        if name is None:
            raise DataError(f"The model has {len(inputs)} inputs {[i.describe() for i in inputs]}; image data fills "
                            "one.", "name it with data.image.input, or use kind 'tensors'.")
        x = np.stack([self._pixels(self._load(p)) for p in df[self.path_column]]) if len(df) else np.zeros((0,))
        return check_feed({name: x}, inputs, what, f"images from column {self.path_column!r}")

    def drift_features(self, df):
        rows = []
        for p in df[self.path_column]:
            im = self._load(p)
            a = np.asarray(im, dtype=np.float32) / 255.0
            m, s = a.reshape(-1, 3).mean(0), a.reshape(-1, 3).std(0)
            rows.append({"image.mean_r": m[0], "image.mean_g": m[1], "image.mean_b": m[2], "image.std_r": s[0],
                         "image.std_g": s[1], "image.std_b": s[2],
                         "image.brightness": float(0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2]),
                         "image.width": float(im.size[0]), "image.height": float(im.size[1])})
        return pd.DataFrame(rows, index=df.index)

    def describe(self):
        return {"kind": self.kind, "path_column": self.path_column, "root": self.root, "resize": self.resize,
                "crop": self.crop, "mean": self.mean.tolist(), "std": self.std.tolist(), "layout": self.layout,
                "input": self.input}
