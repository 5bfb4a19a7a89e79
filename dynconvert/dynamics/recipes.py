"""Recipe files: per-architecture conversion settings in TOML, shipped in the repository's top-level
``recipes/`` folder, which installs as the package data ``dynconvert/_recipes/`` (pyproject.toml).

A recipe sets ConvertOptions fields (``ratio``, ``min_params``, ``include``, ``exclude``,
``metric``, ``kernel``, ``max_dim``, ``groups``, ``dim``, ``steps``, ``lr``, ``seed``) and may name
the ``arch`` it is for and the ``input_size`` used for FLOP counts. CLI flags override recipe values.
Per-layer settings go in tables keyed by a layer-name pattern (later tables win)::

    ratio = 0.25
    [layers."layer4.*"]
    ratio = 0.1
    steps = 600
"""

from __future__ import annotations

import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path

from .conversion import ConvertOptions
from ..errors import DynError


def _recipe_dir() -> Path:
    """Where the shipped recipes are: inside an installed wheel, else the source checkout's recipes/."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "_recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPE_DIR = _recipe_dir()
EXTRA_KEYS = {"arch": str, "input_size": list, "description": str}


def _types() -> dict[str, object]:
    """Each settable key's type, read from ConvertOptions' own annotations."""
    hints = typing.get_type_hints(ConvertOptions)
    return {f.name: hints[f.name] for f in fields(ConvertOptions) if f.name != "device"}


def _fits(value, hint) -> bool:
    """Whether a TOML value has the annotated type (an int is a float; a bool is neither)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)


def _name(hint) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


def find_recipe(name_or_path: str) -> Path:
    """A recipe by path, or by name among the shipped ones (``resnet50`` -> recipes/resnet50.toml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))) or "none"
    raise DynError(f"recipe {name_or_path!r} not found: give a .toml path or one of: {known}")


def load_recipe(name_or_path: str) -> dict:
    """The recipe's values, checked: unknown keys and wrong types are errors that name the key."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DynError(f"recipe {path}: not valid TOML ({e})") from None
    types = _types() | EXTRA_KEYS
    for key, value in data.items():
        if key not in types:
            raise DynError(f"recipe {path}: unknown key {key!r} (known: {', '.join(sorted(types))})")
        if not _fits(value, types[key]):
            raise DynError(f"recipe {path}: key {key!r} must be {_name(types[key])}, got {value!r}")
    return data


def options_from(recipe: dict | None, overrides: dict) -> ConvertOptions:
    """ConvertOptions from defaults, then the recipe, then CLI flags that were given (not None)."""
    known = {f.name for f in fields(ConvertOptions)}
    values = {k: float(v) if k in ("ratio", "lr") else v for k, v in (recipe or {}).items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    opts = ConvertOptions(**values)
    opts.validate()
    return opts
