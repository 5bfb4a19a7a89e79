"""Block-wise reconstruction and calibration augmentation (budget/reconstruct.py, budget/augment.py)."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import one_line_error

from dynconvert.budget.augment import augment, held_apart
from dynconvert.budget.quant import fake_quant
from dynconvert.budget.blocks import find_blocks
from dynconvert.budget.reconstruct import ReconOptions, reconstruct
from dynconvert.errors import DynError


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, 2 * c, 1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.b = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.bn(self.a(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(nn.Sequential(Residual(8), Residual(8)), Residual(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stages(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def quantized_copy(model, bits=4):
    """Every Conv2d/Linear weight rounded to nearest with per-channel scales, as the budget stores it."""
    model = copy.deepcopy(model)
    quantized = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                q = 2 ** (bits - 1) - 1
                scale = m.weight.reshape(len(m.weight), -1).abs().amax(1, keepdim=True) / q
                m.weight.copy_(fake_quant(m.weight, bits, (0,)))
                quantized[f"{name}.weight"] = {"bits": bits, "keep": [0], "scale": scale}
    return model, quantized


def setup(seed=0):
    torch.manual_seed(seed)
    original = Net().eval()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2)
    return original, torch.randn(40, 3, 12, 12)


def test_blocks_are_the_children_of_containers_and_lone_layers():
    original, _ = setup()
    layers = [n for n, m in original.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert find_blocks(original, layers) == ["stem", "stages.0.0", "stages.0.1", "stages.1", "fc"]
    assert find_blocks(original, ["stages.1.b"]) == ["stages.1"]


def test_reconstruction_lowers_the_error_and_ends_on_the_grid():
    original, x = setup()
    model, quantized = quantized_copy(original, bits=4)
    fit, held = held_apart(x)
    before = (model(held) - original(held)).pow(2).mean()
    summary = reconstruct(model, original, fit, quantized, held=held, options=ReconOptions(iters=60, batch=8))
    after = (model(held) - original(held)).pow(2).mean()
    assert after < before
    assert [r["block"] for r in summary["blocks"]] == ["stem", "stages.0.0", "stages.0.1", "stages.1", "fc"]
    state = model.state_dict()
    for key, entry in quantized.items():
        w = state[key]
        q = w / entry["scale"].reshape([-1] + [1] * (w.ndim - 1))
        assert torch.equal(q, q.round()) or (q - q.round()).abs().max() < 1e-5, key
        assert q.round().abs().max() <= 7
    assert not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model.stem, "parametrizations")


def test_reconstruction_is_deterministic_and_iters_zero_is_off():
    original, x = setup()
    runs = []
    for _ in range(2):
        model, quantized = quantized_copy(original)
        reconstruct(model, original, x, quantized, options=ReconOptions(iters=10, batch=8, seed=3))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    model, quantized = quantized_copy(original)
    untouched = copy.deepcopy(model.state_dict())
    assert reconstruct(model, original, x, quantized, options=ReconOptions(iters=0))["blocks"] == []
    assert all(torch.equal(untouched[k], v) for k, v in model.state_dict().items())


def test_a_block_that_gets_worse_on_held_apart_images_is_put_back():
    original, x = setup()
    model, quantized = quantized_copy(original)
    fitted = copy.deepcopy(model.state_dict())
    # a learning rate that throws the rounding around: worse everywhere, so every block goes back
    summary = reconstruct(model, original, x[:8], quantized, held=x[8:],
                          options=ReconOptions(iters=5, batch=8, lr=50.0, warmup=0.0, reg_weight=0.0))
    assert [r["kept"] for r in summary["blocks"]] == [False] * 5
    assert all(r["held_after"] > r["held_before"] for r in summary["blocks"])
    assert all(torch.equal(v, fitted[k]) for k, v in model.state_dict().items())


def test_blocks_of_8_bit_weights_only_are_left_as_fitted():
    from dynconvert.budget.reconstruct import reconstruct_after_fit
    from dynconvert.deploy.report_budget import budget_title

    original, x = setup()
    model, quantized = quantized_copy(original, bits=8)
    low, low_quantized = quantized_copy(original, bits=4)
    for name in ("stages.1.a", "stages.1.b"):  # one block below 8 bits
        model.get_submodule(name).weight.data.copy_(low.get_submodule(name).weight)
        quantized[f"{name}.weight"] = low_quantized[f"{name}.weight"]
    fitted = copy.deepcopy(model.state_dict())
    fit, held = held_apart(x)
    notes = []
    summary = reconstruct(model, original, fit, quantized, held=held, options=ReconOptions(iters=30, batch=8),
                          on_note=notes.append)
    assert [r["block"] for r in summary["blocks"]] == ["stages.1"] and summary["blocks"][0]["tuned"] == 2
    assert summary["int8_only"] == 4 and "4 of 5 blocks hold 8-bit weights only: left as fitted" in notes
    state = model.state_dict()
    assert all(torch.equal(state[k], fitted[k]) for k in state if not k.startswith("stages.1."))
    # every block at 8 bits: nothing is tuned, and the report says why
    model, quantized = quantized_copy(original, bits=8)
    fitted = copy.deepcopy(model.state_dict())
    r = reconstruct_after_fit(model, original, [x], quantized, iters=30)
    assert r["blocks"] == 0 and r["int8_only"] == 5 and r["held_apart"] > 0
    assert all(torch.equal(v, fitted[k]) for k, v in model.state_dict().items())
    budget = dict(target_bytes=1000, original_bytes=4000, planned_bytes=990, calibration="images",
                  calibration_images=40, reconstruction=r)
    assert "no block reconstruction: all 5 blocks hold 8-bit weights only" in budget_title({"budget": budget})


def test_states_are_tuned_jointly_and_stay_on_their_grid():
    from dynconvert.dynamics.layers import make_dynamic
    from dynconvert.dynamics.modules import DynSpec
    from dynconvert.dynamics.conversion import set_submodule

    original, x = setup()
    model, quantized = quantized_copy(original)
    dyn = make_dynamic(model.stages[1].a, DynSpec(2, 4, "sql2", "linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        dyn.set_states(*(fake_quant(torch.randn(2, n, 4) * 0.3, 8, (0, 1)) for n in (16, 8)),
                       torch.tensor([0.1, -0.1]), torch.tensor(0.0))
    set_submodule(model, "stages.1.a", dyn)
    del quantized["stages.1.a.weight"]
    quantized.update({"stages.1.a.states_out": {"bits": 8, "keep": [0, 1]}, "stages.1.a.states_in": {"bits": 8, "keep": [0, 1]}})
    start = dyn.states_out.detach().clone()
    summary = reconstruct(model, original, x, quantized, options=ReconOptions(iters=20, batch=8, state_lr=0.05))
    row = next(r for r in summary["blocks"] if r["block"] == "stages.1")
    assert row["tuned"] == 1 + 4  # the rounding of b; both states, the couplings and the offset of a
    s = dyn.states_out.detach()
    assert row["kept"] and not torch.equal(s, start) and row["fit_after"] < row["fit_before"]
    assert torch.equal(fake_quant(s, 8, (0, 1)), s)


def test_held_apart_and_augmentation():
    x = torch.randn(64, 3, 10, 10)
    fit, held = held_apart(x)
    assert len(fit) + len(held) == 64 and len(held) == 8
    assert not any(torch.equal(h, f) for h in held for f in fit)
    assert len(held_apart(x[:10])[1]) == 0  # too few to spare any
    a, b = augment(x[:4], 12, seed=5), augment(x[:4], 12, seed=5)
    assert a.shape == (12, 3, 10, 10) and torch.equal(a, b)
    assert not torch.equal(a, augment(x[:4], 12, seed=6))
    with pytest.raises(DynError):
        augment(x[:0], 3)


# ---------------------------------------------------------------- in the budget pipeline and the CLI

def budget_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), Residual(64),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 12, 12))
    return net.eval()


def test_budgeted_conversion_reconstructs_and_reads_back_bit_exactly(tmp_path, monkeypatch):
    import dynconvert
    from dynconvert.budget import pipeline

    real = pipeline.unit_candidates

    def int8_stem_states_residual(unit, min_params, group=None):  # both kinds in one block run
        cands = real(unit, min_params, group)
        want = {"0": "int8"}.get(unit.name, "dyn" if unit.name.startswith("3.") else None)
        if want == "int8":
            return [c for c in cands if c.kind == want][:1]
        return cands if want is None else [cands[0]] + [c for c in cands if c.kind == want][:1]

    monkeypatch.setattr(pipeline, "unit_candidates", int8_stem_states_residual)
    x = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    conv = dynconvert.convert(budget_net(), size=0.15, calib=[x], min_params=100, input_size=(3, 12, 12), reconstruct=20)
    r = conv.budget["reconstruction"]
    kinds = [row["kind"] for row in conv.budget["layers"]]
    assert "dyn" in kinds and "int8" in kinds, kinds
    # blocks: the residual "3" (int8 weights, states); the stem conv "0" holds int8 only and is left
    # as fitted; the fp32 classifier is none
    assert r["blocks"] == 1 and r["int8_only"] == 1
    assert r["held_apart"] == 6 and r["images"] == 42 and r["iters"] == 20
    assert r["mean_held_after"] <= r["mean_held_before"]
    path = tmp_path / "m.dyn"
    dynconvert.save(conv, path)
    loaded = dynconvert.load(path, model=budget_net(seed=3))
    mine, back = conv.model.state_dict(), loaded.state_dict()
    assert all(torch.equal(mine[k], back[k]) for k in mine)
    from dynconvert.api import read_meta
    from dynconvert.deploy.report_budget import budget_title

    meta = read_meta(path)
    assert meta["budget"]["reconstruction"] == r  # recorded in the file
    assert "block reconstruction (20 steps): " in budget_title({"budget": meta["budget"]})
    from dynconvert.budget.reconstruct import reconstruct_after_fit

    assert reconstruct_after_fit(conv.model, budget_net(), [x], conv.quantized, iters=0) is None  # reconstruct=0: off


TINY_NET = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 256, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100))
"""


def test_cli_one_tiny_calibration_image_is_a_stated_fallback(cli, tmp_path, monkeypatch):
    from PIL import Image

    from _tiny import import_written

    torch.save(import_written(monkeypatch, tmp_path, "tinynet", TINY_NET).build().state_dict(), tmp_path / "net.pth")
    (tmp_path / "one").mkdir()
    Image.fromarray((torch.rand(3, 3, 3) * 255).byte().numpy()).save(tmp_path / "one" / "tiny.png")
    out = tmp_path / "out.dyn"
    args = ["convert", tmp_path / "net.pth", "--out", out, "--model", "tinynet:build", "--input-size", "3,12,12",
            "--size", "1/4", "--min-params", "100"]
    code, stdout, stderr = cli(*args, "--calib", tmp_path / "one", "--reconstruct-steps", "5")
    assert code == 0, stderr
    said = " ".join((stdout + stderr).split())
    assert "only 1 calibration image: adding 31 augmented crops" in said and "from the same image" in said
    assert out.exists()
    code, stdout, stderr = cli(*args, "--no-reconstruct", "--reconstruct-steps", "3", "--force")
    assert code == 2 and "contradict" in one_line_error(code, stdout, stderr)
    # the research route (states at a --ratio) has no byte-budgeted fit to reconstruct after
    code, stdout, stderr = cli(*args[:-4], "--ratio", "0.25", "--no-reconstruct", "--force")
    assert code == 2 and "add --size" in one_line_error(code, stdout, stderr)


def test_rounding_starts_from_the_fitted_integers():
    """The learned rounding starts at the fitted weights (GPTQ's), not at the original rounded
    afresh: with nothing learned (lr 0) every weight comes back exactly as fitted, here integers
    one step off nearest rounding wherever that is allowed, which round-to-nearest would undo."""
    original, x = setup()
    model, quantized = quantized_copy(original)
    with torch.no_grad():
        for key, entry in quantized.items():
            w = model.get_parameter(key)
            s = entry["scale"].reshape([-1] + [1] * (w.ndim - 1))
            step = torch.where(original.get_parameter(key) / s > w / s, 1.0, -1.0)  # towards the original
            w.copy_(((w / s).round() + step).clamp(-7, 7) * s)
    fitted = copy.deepcopy(model.state_dict())
    reconstruct(model, original, x, quantized, options=ReconOptions(iters=3, batch=8, lr=0.0, reg_weight=0.0))
    state = model.state_dict()
    assert all(torch.allclose(state[k], fitted[k], atol=1e-6) for k in quantized)
