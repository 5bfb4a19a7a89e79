"""Group-wise int2/int3/int4/int8 weights (format version 3): exact packing, exact bytes, read back
bit-identical; the grid consumers see (``quant.grid_of``); a group size that does not divide."""

import json
import struct

import pytest
import torch

from dynconvert.budget import quant
from dynconvert.dynfile.format import read_dyn, write_dyn
from dynconvert.errors import DynError

META = {"source": {"kind": "module"}, "layers": {}}


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_pack_bits_round_trips_at_the_bit_width(bits):
    lo, hi = quant.group_range(bits)
    gen = torch.Generator().manual_seed(bits)
    for numel in (1, 7, 8, 9, 1001):
        q = torch.randint(lo, hi + 1, (numel,), generator=gen).to(torch.int8)
        packed = quant.pack_bits(q, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (numel * bits + 7) // 8
        assert torch.equal(quant.unpack_bits(packed, bits, numel), q)
    q = torch.randint(-8, 8, (33,), generator=gen).to(torch.int8)
    if bits == 4:  # the same bytes as the per-channel int4 storage
        assert torch.equal(quant.pack_bits(q, 4), quant.pack_int4(q))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_grouped_weights_read_back_bit_identical_at_exact_bytes(tmp_path, bits):
    torch.manual_seed(bits)
    conv = torch.randn(24, 8, 3, 3) * torch.rand(24, 1, 1, 1)  # rows of different ranges: n = 72
    lin = torch.randn(10, 128)
    wc, sc = quant.fake_quant_grouped(conv, bits, 24)
    wl, sl = quant.fake_quant_grouped(lin, bits, 64)
    assert sc.shape == (24, 3) and torch.equal(sc.half().float(), sc) and (sl < 0).any()  # signed scales occur
    quantized = {"c.weight": {"bits": bits, "group": 24, "scale": sc}, "l.weight": {"bits": bits, "group": 64}}
    write_dyn(tmp_path / "g.dyn", {"c.weight": wc, "l.weight": wl}, META, quantized=quantized)
    tensors, meta = read_dyn(tmp_path / "g.dyn")
    for name, want in (("c.weight", wc), ("l.weight", wl)):
        assert torch.equal(tensors[name].view(torch.int32), want.view(torch.int32)), name
    assert meta["quantized"]["c.weight"] == {"bits": bits, "group": 24, "shape": [24, 8, 3, 3]}
    h = header(tmp_path / "g.dyn")
    for name, numel, scales in (("c.weight", 24 * 72, [24, 3]), ("l.weight", 1280, [10, 2])):
        q, s = h[f"{name}:q"], h[f"{name}:scale"]
        size = q["data_offsets"][1] - q["data_offsets"][0]
        assert size == (numel * bits + 7) // 8, (name, size)
        assert s["dtype"] == "F16" and s["shape"] == scales
        assert s["data_offsets"][1] - s["data_offsets"][0] == 2 * scales[0] * scales[1]


def test_grid_of_gives_every_consumer_the_integers():
    w, s = quant.fake_quant_grouped(torch.randn(6, 4, 2, 2), 3, 8)
    scale, lo, hi = quant.grid_of(w, {"bits": 3, "group": 8}, s)
    assert scale.shape == w.shape and (lo, hi) == (-4, 3)
    q = torch.round(w / scale)
    assert q.min() >= lo and q.max() <= hi and torch.equal(q * scale, w)
    w8 = quant.fake_quant(torch.randn(5, 7), 8, (0,))  # the per-channel grid is the case G = n
    _, s8 = quant.quantize(torch.randn(5, 7), 8, (0,))
    scale, lo, hi = quant.grid_of(w8, {"bits": 8, "keep": [0]}, s8)
    assert scale.shape == w8.shape and (lo, hi) == (-127, 127)


def test_a_group_that_does_not_divide_is_one_line(tmp_path):
    w, s = quant.fake_quant_grouped(torch.randn(4, 96), 4, 32)
    with pytest.raises(DynError, match="does not divide") as e:
        write_dyn(tmp_path / "bad.dyn", {"w": w}, META, quantized={"w": {"bits": 4, "group": 64}})
    assert "\n" not in str(e.value) and not (tmp_path / "bad.dyn").exists()
    with pytest.raises(DynError, match="does not divide"):
        quant.check_group(96, 64)
    assert quant.pick_group(96) == 48 and quant.pick_group(27) == 27 and quant.pick_group(1280) == 64


def test_round_to_storage_keeps_a_grouped_weight_that_is_still_on_its_grid():
    """finetune re-rounds what a .dyn stores quantized: an untouched group-wise weight (the base of
    a state correction) must come back bit-identical, not re-rounded on freshly searched scales."""
    w, _ = quant.fake_quant_grouped(torch.randn(8, 64) * torch.rand(8, 1), 3, 32)
    layer = torch.nn.Linear(64, 8)
    layer.weight.data.copy_(w)
    out = quant.round_to_storage(layer, {"weight": {"bits": 3, "group": 32}})
    assert torch.equal(layer.weight.data, w) and out["weight"]["scale"].shape == (8, 2)
    layer.weight.data.add_(0.01)  # moved off the grid by training: back on a searched one
    quant.round_to_storage(layer, {"weight": {"bits": 3, "group": 32}})
    assert quant.recover_scales(layer.weight.data, 3, 32) is not None
