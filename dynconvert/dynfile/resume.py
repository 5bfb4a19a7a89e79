"""Resumable conversion: every finished layer's fit is saved as it finishes, so an interrupted
``convert`` rerun with ``--resume`` skips those layers. A budgeted conversion (``--size``,
``--target-bytes``) saves its synthesized inputs and each layer's measured candidates instead
(``BudgetCheckpoint``): the measurement is most of its time, and it is deterministic per layer, so
a resumed run allocates and fits exactly as an uninterrupted one and writes the same bytes.

The fits live in a folder beside the output, ``<out>.partial/``, one safetensors file per layer
(written atomically, so a kill leaves each file whole or absent, and a large model does not rewrite
everything after every layer). Each file records a fingerprint of the source checkpoint's sha256
and the conversion options: a resume with another checkpoint or other options is refused. The
folder is removed once the final .dyn is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch

from ..version import __version__
from ..dynamics.conversion import ConvertCallbacks, ConvertOptions, Planned
from ..dynamics.modules import dense_matrix
from ..errors import DynError
from ..dynamics.fit import FitResult
from ..io.safetensors_io import read_safetensors, write_safetensors

META_KEY = "dynconvert_partial"


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def fingerprint(options: ConvertOptions, source_sha256: str, source: dict) -> str:
    """What must match for saved fits to be reused. The device is left out: a fit made on a GPU is
    as valid on the CPU (only its last bits may differ)."""
    opts = {k: v for k, v in options.to_dict().items() if k != "device"}
    blob = json.dumps({"options": opts, "source_sha256": source_sha256, "source": source, "version": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_fit(folder: Path, index: int, name: str, fit: FitResult, print_: str) -> None:
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise DynError(f"cannot create {folder} (where finished layers are kept): {e.strerror or e}") from None
    tensors, extra = {}, {}
    for f in fields(FitResult):
        value = getattr(fit, f.name)
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise DynError(f"layer {name}: its fitted {f.name} contains NaN or Inf; nothing was written")
            tensors[f.name] = value
        else:
            extra[f.name] = value
    meta = {"name": name, "fingerprint": print_, "fields": extra}
    write_safetensors(folder / f"{index:05d}.safetensors", tensors, {META_KEY: json.dumps(meta, sort_keys=True)})


def load_fits(folder: Path, print_: str) -> dict[str, FitResult]:
    """The saved fits of an interrupted run with the same fingerprint."""
    hint = f"delete {folder} or rerun without --resume (with --force) to start over"
    done = {}
    for file in _files(folder):
        tensors, meta = _read(file, print_, hint)
        if file.name.startswith(BUDGET_PREFIX):
            raise _mismatch(folder, hint)  # a budgeted run's measurements: not this conversion's
        try:
            done[meta["name"]] = FitResult(**tensors, **meta["fields"])
        except (KeyError, TypeError, ValueError):
            raise DynError(f"{file} is not a saved layer fit (corrupt); {hint}") from None
    return done


def _read(file: Path, print_: str, hint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a saved file, refused unless made with fingerprint ``print_``."""
    tensors, raw = read_safetensors(file)
    try:
        meta = json.loads(raw[META_KEY])
        fp = meta["fingerprint"]
    except (KeyError, TypeError, ValueError):
        raise DynError(f"{file} is not a saved layer fit (corrupt); {hint}") from None
    if fp != print_:
        raise _mismatch(file.parent, hint)
    return tensors, meta


def _mismatch(folder: Path, hint: str) -> DynError:
    return DynError(f"{folder} was made from another checkpoint or with other options; rerun with the same ones, "
                    f"or {hint}")


def check_fits(done: dict[str, FitResult], chosen: list[Planned], folder: Path) -> None:
    """Saved fits must have exactly the shapes the plan gives their layers, and finite values."""
    planned = {p.name: p for p in chosen}
    for name, fit in done.items():
        item = planned.get(name)
        if item is None:
            raise DynError(f"{folder}: saved layer {name!r} is not in this conversion's plan; delete the folder to start over")
        m, n = dense_matrix(item.layer).shape
        h, d = item.spec.groups, item.spec.dim
        want = {"states_out": (h, m, d), "states_in": (h, n, d), "coupling": (h,), "offset": ()}
        for key, shape in want.items():
            t = getattr(fit, key)
            if tuple(t.shape) != shape or not t.is_floating_point() or not torch.isfinite(t).all():
                raise DynError(f"{folder}: saved fit of layer {name!r} is invalid ({key}); delete the folder to start over")


class Checkpointing:
    """Wraps the progress callbacks: saves each layer's fit before reporting it done.

    Not a ConvertCallbacks subclass, so hooks it does not define reach the wrapped object."""

    def __init__(self, inner: ConvertCallbacks | None, folder: Path, print_: str, done: dict[str, FitResult]):
        self.inner = inner or ConvertCallbacks()
        self.folder, self.print_, self.done = folder, print_, done

    def layer_start(self, index, total, item):
        self.inner.layer_start(index, total, item)

    def step(self, step, steps, rel_error):
        self.inner.step(step, steps, rel_error)

    def layer_done(self, index, total, stats, fit):
        if stats.name not in self.done:
            save_fit(self.folder, index, stats.name, fit, self.print_)
        self.inner.layer_done(index, total, stats, fit)

    def __getattr__(self, attr):  # hooks added to ConvertCallbacks later reach the wrapped one
        return getattr(self.inner, attr)


class BudgetCheckpoint:
    """What a budgeted conversion saves as it goes (budget/pipeline.py calls it): the synthesized
    inputs, then each layer's measured candidates (which of its candidates ran, their network
    errors, the report's rows). Files ``budget-*.safetensors`` in the partial folder, each written
    atomically and stamped with the fingerprint; ``resume`` reads back the ones an interrupted run
    left (refusing another fingerprint's)."""

    def __init__(self, folder: Path, print_: str, resume: bool):
        self.folder, self.print_ = folder, print_
        hint = f"delete {folder} or rerun without --resume (with --force) to start over"
        self.units: dict[str, dict] = {}
        self.saved_inputs: list[torch.Tensor] | None = None
        if resume and folder.is_dir():
            for file in _files(folder):
                if not file.name.startswith(BUDGET_PREFIX):  # a ratio conversion's layer fits
                    raise _mismatch(folder, hint)
                tensors, meta = _read(file, print_, hint)
                if "inputs" in meta:
                    self.saved_inputs = list(tensors["inputs"].split(meta["inputs"]))
                elif "unit" in meta:
                    self.units[meta["unit"]] = meta["measured"]
                else:
                    raise DynError(f"{file} is not a saved measurement (corrupt); {hint}")

    def inputs(self) -> list[torch.Tensor] | None:
        return self.saved_inputs

    def save_inputs(self, batches: list[torch.Tensor]) -> None:
        self._write("inputs", {"inputs": torch.cat(batches)}, {"inputs": [len(b) for b in batches]})
        self.saved_inputs = list(batches)

    def measured(self, unit: str) -> dict | None:
        """The saved measurement of ``unit``: {"run": [[candidate index, network error], ...],
        "rows": the report's rows, "sensitivity": float or None}."""
        return self.units.get(unit)

    def save_measured(self, index: int, unit: str, record: dict) -> None:
        self._write(f"unit{index:05d}", {}, {"unit": unit, "measured": record})
        self.units[unit] = record  # an over-budget retry in the same run reuses it too

    def _write(self, stem: str, tensors: dict, meta: dict) -> None:
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError as e:
            raise DynError(f"cannot create {self.folder} (where measured layers are kept): {e.strerror or e}") from None
        meta = {**meta, "fingerprint": self.print_}  # floats as JSON: repr is exact, so a resume is bit-exact
        write_safetensors(self.folder / f"{BUDGET_PREFIX}{stem}.safetensors", tensors, {META_KEY: json.dumps(meta)})


BUDGET_PREFIX = "budget-"
_SAVED = ("[0-9]*.safetensors", f"{BUDGET_PREFIX}*.safetensors")


def _files(folder: Path) -> list[Path]:
    return sorted(f for pattern in _SAVED for f in folder.glob(pattern))


def saved(folder: Path) -> int:
    """How many saved files (finished layers, measured layers, inputs) ``folder`` holds (0 when it
    does not exist)."""
    return len(_files(folder)) if folder.is_dir() else 0


def remove(folder: Path) -> None:
    """Delete the saved files (and temporary files a kill left); never anything else a user put there."""
    if not folder.is_dir():
        return
    for f in [*_files(folder), *(t for p in _SAVED for t in folder.glob(f".{p}.*.part"))]:
        f.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else lives there: leave it
