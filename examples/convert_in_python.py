"""Convert a torchvision model in Python, save it, load it back, and compare with truncated SVD.

    python examples/convert_in_python.py
"""

import torch
import torchvision

import dynconvert

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)  # use your trained weights here
result = dynconvert.convert(model, ratio=0.25, steps=100, min_params=100_000)
for layer in result.layers:
    print(f"{layer.name:<20} {str(tuple(layer.matrix_shape)):>12}  states/dense {layer.ratio:.3f}  "
          f"error {layer.rel_error:.4f}  (truncated SVD at the same budget {layer.svd_rel_error:.4f})")

dynconvert.save(result, "resnet18.dyn")
loaded = dynconvert.load("resnet18.dyn")  # a torchvision model rebuilds by its builder's name
x = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    print("max |loaded - in memory| =", float((loaded(x) - result.model(x)).abs().max()))
