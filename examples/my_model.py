"""An architecture torchvision does not have, for `--model examples.my_model:build`.

    python -c "import torch, examples.my_model as m; torch.save(m.build().state_dict(), 'my.pth')"
    dynconvert convert my.pth --model examples.my_model:build --input-size 3,32,32 --out my.dyn
    dynconvert report my.dyn --model examples.my_model:build
    dynconvert export my.dyn --model examples.my_model:build --onnx my.onnx
"""

import torch.nn as nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
