"""The candidate measurement sized to the network (budget/affordable.py): measured in full on small
networks, predicted from one network run per layer on large ones, with the input moments collected a
few layers at a time; and the trials' fits held small (budget/table.py)."""

import pytest
import torch

import dynconvert
from dynconvert.budget import affordable, keep as kp, originals, pipeline
from dynconvert.budget.allocation import Candidate
from dynconvert.budget.candidates import fit_candidate
from dynconvert.budget.probe import Probe, forward_macs
from dynconvert.budget.suffix import Suffix
from dynconvert.budget.table import Rounded, kept_fit, unkept
from dynconvert.dynamics.calibration import collect_moments
from test_budget import bn_net, images
from test_transformer import _vit

SYNTHETIC = "synthetic (BatchNorm statistics)"


def test_plan_measures_small_networks_in_full_and_predicts_large_ones():
    vit_b = affordable.plan(int(17.6e9), 74, 16, 74 * 8)  # ViT-B/16 at 224, --size 1/4: 8 candidates a unit
    assert vit_b == affordable.Plan(16, False, int(17.6e9))
    vit_l = affordable.plan(int(61.6e9), 97, 16, 97 * 8)  # ViT-L/16, weight-space candidates only
    assert vit_l.predicted and vit_l.images == 4
    vit_h = affordable.plan(int(167e9), 129, 16, 129 * 8)
    assert vit_h.predicted and vit_h.images == affordable.MIN_IMAGES


def test_forward_macs_counts_the_attention_projections():
    net = _vit()
    tokens, d, mlp, layers = 17, 32, 64, 2  # 16 patches of 8 x 8 and the class token
    expected = 16 * d * 3 * 8 * 8 + layers * tokens * (4 * d * d + 2 * d * mlp) + d * 10
    assert forward_macs(net, (3, 32, 32)) == expected


@pytest.mark.parametrize("make, size", [(bn_net, 16), (_vit, 32)])
def test_chunked_moments_are_the_one_pass_moments(make, size):
    net = make()
    units, _ = pipeline.find_units(net)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    names = [p.name for u in units for p in u.parts]
    whole = collect_moments(names, [x], net)
    chunked = affordable.ChunkedMoments(net, units, x, Suffix(net, names, x), cap=1)  # one unit a chunk
    for n in names:
        assert torch.allclose(chunked[n].own, whole[n].own, rtol=1e-5, atol=1e-6), n
    assert set(chunked.held) == {p.name for p in units[-1].parts}  # the chunks before were dropped


def test_predicted_measurement_runs_int4_in_the_network_and_predicts_the_other_grids(monkeypatch):
    monkeypatch.setattr(affordable, "MEASURE_MACS", 0)
    monkeypatch.setattr(affordable, "PREDICTED_MACS", 0)  # as few images as a huge network gets
    net = bn_net()
    setup = pipeline.prepare(net, min_params=2000)
    table = pipeline.measure(setup, images(), calibration="images", keep_fits=True)
    assert table.measurement["predicted"] and table.measurement["images"] == affordable.MIN_IMAGES
    for u in table.units:
        rows = table.notes[u.name]
        int4 = next(r for r in rows if r["kind"] == "int4")
        assert "predicted" not in int4 and int4["network_error"] > 0
        sensitivity = table.sensitivity[u.name]
        assert sensitivity == pytest.approx(int4["network_error"] / int4["layer_error"])
        guessed = [r for r in rows if r.get("predicted")]
        assert guessed and all(r["kind"] not in ("fp32", "dyn") and r["network_error"] == pytest.approx(
            sensitivity * r["layer_error"]) for r in guessed)
        # states are not predicted: a low-rank error moves a network unlike a rounding error
        assert all("predicted" not in r for r in rows if r["kind"] == "dyn")
    result = pipeline.fit_allocation(table, table.allocation(60_000), 60_000)
    assert result.summary["measurement"]["predicted"]


def test_the_keep_route_on_a_network_it_cannot_measure_in_full_still_keeps_it(monkeypatch):
    monkeypatch.setattr(affordable, "MEASURE_MACS", 0)
    conv = dynconvert.convert(bn_net(), keep=0.9, calib=images(128), min_params=2000, input_size=(3, 16, 16))
    assert conv.budget["measurement"]["predicted"] and conv.keep["reached"] >= 0.9 - 0.03


@pytest.mark.parametrize("kind, bits, group", [("int8", 8, 0), ("int4", 4, 16), ("int2", 2, 16), ("int4", 4, 0),
                                               ("fp16", None, 0)])
def test_a_kept_fit_gives_back_the_fitted_weight_exactly(kind, bits, group):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=g), torch.randn(256, 64, generator=g)
    cand = Candidate(kind, 1, group=group)
    fitted = fit_candidate(cand, w, x.T @ x / 256, 0, gptq=True)
    kept = kept_fit(fitted, fitted.dense())
    assert torch.equal(unkept(kept, cand, w), fitted.dense())
    assert sum(t.numel() * t.element_size() for t in (kept if isinstance(kept, tuple) else (kept,))) < 4 * w.numel() // 1.9


def test_trials_on_synthetic_inputs_round_again_instead_of_keeping_fits():
    net = bn_net()
    setup = pipeline.prepare(net, min_params=2000)
    table = pipeline.measure(setup, images(), calibration=SYNTHETIC, keep_fits=True)
    assert all(isinstance(f, Rounded) for per in table.fits.values() for fs in per.values() for f in fs)
    originals = {k: v.clone() for k, v in net.state_dict().items()}
    cheapest = {n: min(range(len(o)), key=lambda i: o[i][0].bytes) for n, o in table.options.items()}
    with table.trial(cheapest) as model:
        for u in table.units:
            cand = table.options[u.name][cheapest[u.name]][0]
            w = originals[f"{u.name}.weight"]
            rounded = fit_candidate(cand, w.reshape(w.shape[0], -1), None, 0, gptq=False).dense()
            assert torch.equal(model.get_submodule(u.name).weight, rounded.reshape(w.shape))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in originals.items())


def test_a_fit_rounding_to_nearest_skips_the_moments_pass(monkeypatch):
    net = bn_net()
    setup = pipeline.prepare(net, min_params=2000)
    table = pipeline.measure(setup, images(), calibration=SYNTHETIC)
    passes = []
    real = pipeline.collect_moments
    monkeypatch.setattr(pipeline, "collect_moments", lambda *a, **k: passes.append(1) or real(*a, **k))
    rtn = {n: next(i for i, (c, _) in enumerate(o) if c.kind == "int8") for n, o in table.options.items()}
    pipeline.fit_allocation(table, rtn, 10**9)
    assert not passes


def _keep_without_images(net, **kw):
    return kp.convert_to_keep(net, 0.9, None, input_size=(3, 16, 16), min_params=2000, synthetic_images=16, **kw)


def test_spilled_originals_give_the_same_file_with_one_copy_of_the_weights(monkeypatch):
    """No images: nothing runs the original forward, so a large network's weights go to a file
    (originals.py) instead of a second copy in memory; the conversion is the same."""
    in_memory = bn_net()
    a = _keep_without_images(in_memory)
    monkeypatch.setattr(originals, "SPILL_BYTES", 0)
    copies = []
    real_prepare = kp.prepare
    monkeypatch.setattr(kp, "prepare", lambda *args, **kw: copies.append(real_prepare(*args, **kw)) or copies[-1])
    spilled = bn_net()
    b = _keep_without_images(spilled)
    assert copies[0].original is None and isinstance(copies[0].originals, originals.Spilled)
    assert a.budget.summary == b.budget.summary and a.keep["trials"] == b.keep["trials"]
    mine, theirs = in_memory.state_dict(), spilled.state_dict()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_a_refit_from_spilled_originals_starts_from_the_weights_as_they_were(monkeypatch):
    """The first fitted network misses the target: the refit reads the spilled weights back into the
    same layers, and the file is the one the in-memory original gives."""
    real, real_fit = Probe.agreement, kp.fit_allocation
    runs = []
    for spill in (False, True):
        monkeypatch.setattr(originals, "SPILL_BYTES", 0 if spill else 2**40)
        fits = []
        monkeypatch.setattr(kp, "fit_allocation", lambda *a, **k: fits.append(a[2]) or real_fit(*a, **k))
        monkeypatch.setattr(Probe, "agreement", lambda self, model: real(self, model) * 0 + (len(fits) != 1))
        net = bn_net()
        res = _keep_without_images(net)
        assert len(res.keep["refits"]) == 1 and fits == [res.keep["refits"][0]["budget"], res.keep["budget_bytes"]]
        runs.append((res.budget.summary, net.state_dict()))
    (sa, a), (sb, b) = runs
    assert sa == sb and all(torch.equal(a[n], b[n]) for n in a)


def test_a_reconstruction_asked_for_without_images_keeps_the_original_network(monkeypatch):
    """The block reconstruction runs the original forward: its weights are not spilled then."""
    monkeypatch.setattr(originals, "SPILL_BYTES", 0)
    res = _keep_without_images(bn_net(), reconstruct_iters=2)
    assert res.budget.summary["reconstruction"] is not None
