"""dynconvert: rewrite pretrained vision models in the dynamics-based form of Pei & Wang (ICML 2023)."""

__version__ = "0.1.0"

from .api import build_report, convert, export_onnx, export_pth, export_safetensors, load, save  # noqa: E402
from .distill import distill  # noqa: E402

__all__ = ["convert", "load", "save", "distill", "build_report", "export_onnx", "export_pth", "export_safetensors",
           "__version__"]
