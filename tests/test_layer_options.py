"""Per-layer options: pattern -> settings, from Python, recipes and --layer; later patterns win."""

import pytest
import torch
import torch.nn as nn

import dynconvert
from dynconvert.dynamics.conversion import ConvertOptions
from dynconvert.errors import DynError
from dynconvert.dynamics.recipes import load_recipe, options_from


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_for_layer_applies_matching_patterns_in_order():
    opts = ConvertOptions(ratio=0.25, layers={"*": {"ratio": 0.5, "steps": 7}, "2": {"ratio": 0.1}})
    assert opts.for_layer("0").ratio == 0.5 and opts.for_layer("0").steps == 7
    assert opts.for_layer("2").ratio == 0.1 and opts.for_layer("2").steps == 7
    plain = ConvertOptions(layers={"fc": {"ratio": 0.1}})
    assert plain.for_layer("conv1") is plain


def test_each_layer_gets_its_own_budget_and_the_rest_the_default():
    conv = dynconvert.convert(net(), ratio=0.25, min_params=0, steps=5, layers={"2": {"ratio": 0.05}, "4": {"ratio": 0.5}})
    share = {s.name: s.state_params / s.dense_params for s in conv.layers}
    assert share["2"] <= 0.05 < share["0"] <= 0.25 < share["4"] <= 0.5


def test_a_layer_option_that_cannot_be_per_layer_is_named():
    with pytest.raises(DynError, match="include cannot be set per layer"):
        ConvertOptions(layers={"fc": {"include": ["x"]}}).validate()
    with pytest.raises(DynError, match="ratio must be in"):
        ConvertOptions(layers={"fc": {"ratio": 3}}).validate()


def test_recipes_carry_layer_tables(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('ratio = 0.25\n[layers."4"]\nratio = 0.5\nsteps = 3\n')
    opts = options_from(load_recipe(str(path)), {})
    assert opts.layers == {"4": {"ratio": 0.5, "steps": 3}} and opts.for_layer("4").ratio == 0.5
    path.write_text('[layers."4"]\nwidth = 3\n')
    with pytest.raises(DynError, match="width cannot be set per layer"):
        options_from(load_recipe(str(path)), {})
