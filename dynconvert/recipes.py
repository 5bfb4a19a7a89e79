"""Recipe files: per-architecture conversion settings in TOML, kept in ``recipes/``.

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
from dataclasses import fields
from pathlib import Path

from .convert import ConvertOptions
from .errors import DynError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
EXTRA_KEYS = {"arch": str, "input_size": list, "description": str}


def _types() -> dict[str, type]:
    hints = {"float": float, "int": int, "str": str, "list[str]": list, "int | None": int, "dict": dict}
    return {f.name: hints[str(f.type)] for f in fields(ConvertOptions) if f.name != "device"}


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
        want = types[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if want is list and ok and key in ("include", "exclude"):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise DynError(f"recipe {path}: key {key!r} must be {want.__name__}, got {value!r}")
    return data


def options_from(recipe: dict | None, overrides: dict) -> ConvertOptions:
    """ConvertOptions from defaults, then the recipe, then CLI flags that were given (not None)."""
    known = {f.name for f in fields(ConvertOptions)}
    values = {k: float(v) if k in ("ratio", "lr") else v for k, v in (recipe or {}).items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    opts = ConvertOptions(**values)
    opts.validate()
    return opts
