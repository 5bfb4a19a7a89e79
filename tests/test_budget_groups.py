"""Byte budgets with group-wise int4/int3/int2 and ``intK + states`` corrections: the corrected
layer end to end (fit, .dyn, rebuild, ONNX Runtime), the stated per-channel fallback of a group
size that does not divide, and the smallest reachable --size named in the error."""

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import dynconvert
import dynconvert.budget.pipeline as pipeline
from dynconvert.budget.pipeline import choice_lines
from dynconvert.dynamics.corrected import CorrectedConv2d, CorrectedLinear
from dynconvert.errors import DynError
from test_budget import bn_net, images


def only(kinds):
    """unit_candidates keeping the first offered of ``kinds`` (plus fp32): forces a choice."""
    real = pipeline.unit_candidates

    def pick(unit, min_params, group=None):
        cands = real(unit, min_params, group)
        for kind in kinds:
            found = [c for c in cands if c.kind == kind]
            if found:
                return [cands[0], found[0]]
        raise AssertionError(f"none of {kinds} offered for {unit.name}")
    return pick


def test_state_corrections_fit_store_rebuild_and_export_thin(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "unit_candidates", only(["int3+dyn", "int4"]))
    net = bn_net()
    conv = dynconvert.convert(net, size=0.2, calib=images(), min_params=2000, input_size=(3, 16, 16))
    corrected = {n: m for n, m in conv.model.named_modules() if isinstance(m, (CorrectedConv2d, CorrectedLinear))}
    assert {"9", "14"} <= set(corrected) <= {"3", "9", "14"}, corrected  # 1x1 convs, the Linear; no depthwise
    assert set(conv.budget["kinds"]) <= {"int3+dyn", "int4 per-channel", "fp32"}, conv.budget["kinds"]
    assert conv.budget["kinds"]["int3+dyn"] == len(corrected)
    assert any(f"state corrections (intK + states): offered on 3 layers, measured in the network on 3, chosen on "
               f"{len(corrected)}" in line for line in choice_lines(conv.budget)), choice_lines(conv.budget)
    path = tmp_path / "c.dyn"
    dynconvert.save(conv, path)
    assert path.stat().st_size <= 0.2 * sum(t.numel() * 4 for t in bn_net().state_dict().values())
    loaded = dynconvert.load(path, model=bn_net(seed=5))
    x = images(8, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), conv.model(x))
        assert torch.equal(loaded.get_submodule("14").base, corrected["14"].base)  # int3 read back bit-exactly
    meta = dynconvert.dynfile.format.read_dyn(path)[1]
    assert meta["layers"]["14"]["kind"] == "linear+q" and meta["quantized"]["14.base"]["bits"] == 3
    res = dynconvert.export_onnx(path, tmp_path / "c.onnx", model=bn_net(seed=5))  # fails unless ORT matches torch
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "c.onnx")).graph.initializer}
    floats = [a for a in inits.values() if a.dtype == np.float32]
    for m, n in ((256, 128), (512, 256)):  # a corrected layer: never a dense float weight or dense correction
        assert not [a for a in floats if a.size >= m * n], (m, n, [a.shape for a in floats if a.size >= m * n])
    assert {"9.base", "14.base"} <= set(res.quantized), res.quantized  # the int3 bases travel as integers:
    packed = sum(a.size for a in inits.values() if a.dtype == np.uint8)  # bit planes, 3 bits a value
    assert 512 * 256 * 3 // 8 <= packed < 512 * 256 // 2 + 256 * 128 // 2, packed


def test_a_quant_group_that_does_not_divide_falls_back_and_says_so():
    notes = []
    conv = dynconvert.convert(bn_net(), size=0.1, calib=images(), min_params=2000, input_size=(3, 16, 16),
                              quant_group=64, reconstruct=0, on_note=notes.append)
    assert conv.budget["per_channel_fallback"] == ["0", "3", "6"]  # 27, 32 and 9 inputs per row
    assert any("--quant-group 64 does not divide" in n and "one scale per output channel" in n for n in notes), notes
    for key, entry in conv.quantized.items():
        if "group" in entry:
            n = conv.model.state_dict()[key][0].numel()
            assert entry["group"] == (64 if n % 64 == 0 else n), (key, entry["group"])
    with pytest.raises(DynError, match="--quant-group 0 must be a positive") as e:
        dynconvert.convert(bn_net(), size=0.1, calib=images(), input_size=(3, 16, 16), quant_group=0)
    assert "\n" not in str(e.value)


def test_a_size_below_int2_everywhere_names_the_smallest_reachable(tmp_path):
    with pytest.raises(DynError, match="below the smallest") as e:
        dynconvert.convert(bn_net(), size=0.01, calib=images(), min_params=10**9, input_size=(3, 16, 16))
    text = str(e.value)
    assert "\n" not in text and "int2" in text
    smallest = float(re.search(r"--size (0\.\d+)", text).group(1))
    size = smallest + 0.001  # the named size is reachable: a file that fits
    conv = dynconvert.convert(bn_net(), size=size, calib=images(), min_params=10**9, input_size=(3, 16, 16),
                              reconstruct=0)
    assert "int2" in conv.budget["kinds"], conv.budget["kinds"]
    dynconvert.save(conv, tmp_path / "s.dyn")
    assert (tmp_path / "s.dyn").stat().st_size <= size * sum(t.numel() * 4 for t in bn_net().state_dict().values())
