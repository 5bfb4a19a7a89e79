"""An exported ONNX graph on disk: one file, or, when its weights pass what one protobuf can hold,
the graph and one external data file beside it (``model.onnx`` + ``model.onnx.data``), which the
graph names by file name alone so that the pair moves together. Used by export.export_onnx.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DynError, first_line

EXTERNAL_DATA_ABOVE = int(1.8 * 2**30)
"""Initializer bytes above which an export keeps its weights in ``<out>.data``: one protobuf cannot
pass 2 GiB, and the graph's nodes and small constants need headroom."""


def external_data_path(onnx_path: str | Path) -> Path:
    """Where an ONNX graph's weights go when they are not in it: ``model.onnx`` -> ``model.onnx.data``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".data")


def check_external_data_path(onnx_path: str | Path, force: bool) -> Path:
    """Refuse, before work starts, a ``<out>.data`` that an export to ``onnx_path`` may not touch:
    the export writes it (weights in a file of their own) or removes it (an earlier export's)."""
    data = external_data_path(onnx_path)
    if data.exists() and not data.is_file():
        raise DynError(f"{data} exists and is not a regular file; an ONNX export to {Path(onnx_path).name} writes "
                       "its weights there (or removes an earlier export's): move it or give another output path")
    if data.exists() and not force:
        raise DynError(f"{data} already exists (the weights of an earlier ONNX export); pass --force to overwrite it")
    return data


def over_one_file(weight_bytes: int) -> bool:
    """Whether a graph with ``weight_bytes`` of initializers keeps them in an external data file."""
    return weight_bytes > EXTERNAL_DATA_ABOVE


def save(graph, path: Path, external: bool) -> bool:
    """Write ``graph`` at ``path`` (a fresh folder's); with ``external``, every tensor of 1 KiB or
    more into one file, ``external_data_path(path)``, instead of the exporter's one per tensor.
    True when that file was written (not when no tensor reaches 1 KiB)."""
    import onnx

    data = external_data_path(path)
    try:
        onnx.save(graph, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)
    except ValueError as e:  # over 2 GiB in all though the weights are under the threshold (big constants)
        hint = "" if external else "; pass --external-data"
        raise DynError(f"cannot save the ONNX graph ({first_line(e)}){hint}") from None
    return data.exists()
