"""dynconvert: rewrite pretrained vision models in the dynamics-based form of Pei & Wang (ICML 2023)."""

__version__ = "0.1.0"

from .api import convert, export_onnx, export_pth, export_safetensors, load, report, save  # noqa: E402

__all__ = ["convert", "load", "save", "report", "export_onnx", "export_pth", "export_safetensors", "__version__"]
