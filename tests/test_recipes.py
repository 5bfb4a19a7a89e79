"""Recipes: every shipped one loads and validates; bad keys and types are named; flags override them."""

import pytest

from dynconvert.dynamics.conversion import ConvertOptions
from dynconvert.errors import DynError
from dynconvert.dynamics.recipes import RECIPE_DIR, find_recipe, load_recipe, options_from

SHIPPED = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def test_the_shipped_recipes_are_there():
    assert {"resnet18", "resnet50", "mobilenet_v2", "vgg16"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_gives_valid_options(name):
    rec = load_recipe(name)
    opts = options_from(rec, {})
    assert isinstance(opts, ConvertOptions) and 0 < opts.ratio <= 1
    assert opts.ratio == pytest.approx(rec["ratio"]) and opts.metric == rec.get("metric", ConvertOptions.metric)


def test_flags_given_override_the_recipe_and_absent_ones_do_not():
    opts = options_from({"ratio": 0.25, "steps": 300}, {"ratio": 0.5, "steps": None, "include": []})
    assert opts.ratio == 0.5 and opts.steps == 300 and opts.include == []


def test_options_from_leaves_the_defaults_alone():
    options_from({"include": ["fc"], "ratio": 0.1}, {"exclude": ["conv1"]})
    fresh = ConvertOptions()
    assert fresh.include == [] and fresh.exclude == [] and fresh.ratio == 0.25


@pytest.mark.parametrize("text,message", [
    ("ratios = 0.2\n", "unknown key 'ratios'"),
    ("ratio = 'small'\n", "key 'ratio' must be float"),
    ("steps = true\n", "key 'steps' must be int"),
    ("include = [1, 2]\n", "key 'include' must be list"),
    ("ratio = [\n", "not valid TOML"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(DynError, match=message):
        load_recipe(str(path))


def test_an_invalid_value_is_refused_when_the_options_are_built(tmp_path):
    with pytest.raises(DynError, match="ratio must be in"):
        options_from({"ratio": 1.5}, {})


def test_an_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(DynError, match="resnet18"):
        find_recipe("no-such-recipe")
