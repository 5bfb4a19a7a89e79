"""dynconvert: rewrite pretrained vision models in the dynamics-based form of Pei & Wang (ICML 2023)."""

from .version import __version__
from .api import build_report, convert, export_onnx, export_pth, export_safetensors, load, save
from .distill import distill

__all__ = ["convert", "load", "save", "distill", "build_report", "export_onnx", "export_pth", "export_safetensors",
           "__version__"]
