"""Vision transformers: nn.MultiheadAttention's projections converted, listed, saved, loaded,
fine-tunable and exported (materialized and weight-free) on a tiny torchvision ViT."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torchvision

import dynconvert
from dynconvert.budget.quant import GROUP_BITS
from dynconvert.dynamics.attention import ConvertedMultiheadAttention, WeightFreeAttention
from dynconvert.dynfile.format import read_dyn
from dynconvert.dynamics.weightfree import to_weight_free
from dynconvert.errors import DynError
from _tiny import VIT

QKV = ("q_proj", "k_proj", "v_proj")


def _vit(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=hidden, mlp_dim=2 * hidden, num_classes=10)
    nn.init.normal_(net.heads.head.weight, std=0.2)  # torchvision starts the head at zero: outputs would be 0
    return net.eval()


@pytest.fixture
def vit_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "tinyvit.py").write_text(VIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(_vit().state_dict(), tmp_path / "vit.pth")
    return tmp_path / "vit.pth", "tinyvit:build"


def test_vit_projections_converted_listed_and_exported(cli, tmp_path, vit_checkpoint):
    pth, factory = vit_checkpoint
    dyn = tmp_path / "v.dyn"
    code, out, err = cli("convert", pth, "--model", factory, "--out", dyn, "--min-params", 500, "--steps", 5,
                         "--input-size", "3,32,32")
    assert code == 0, err
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert f"{attn}.q_proj" in out + err  # the progress lists the in-projections like every other layer
    meta = read_dyn(dyn)[1]
    for block in (0, 1):
        for child in QKV:
            info = meta["layers"][f"encoder.layers.encoder_layer_{block}.self_attention.{child}"]
            assert info["kind"] == "mha_proj" and info["matrix_shape"] == [32, 32]
    skipped = {s["name"]: s["reason"] for s in meta["skipped"]}
    assert "used directly by Encoder.forward" in skipped["encoder.pos_embedding"]  # never silently dense

    # load: the packed parameter is gone, the MHA reads the states; the .pth export restores it
    net = dynconvert.load(dyn, factory=factory)
    mha = net.get_submodule(attn)
    assert isinstance(mha, ConvertedMultiheadAttention) and "in_proj_weight" not in mha._parameters
    assert torch.equal(mha.in_proj_weight, torch.cat([mha.get_submodule(c).weight for c in QKV]))
    code, _, err = cli("export", dyn, "--model", factory, "--pth", tmp_path / "dense.pth")
    assert code == 0, err
    plain = _vit()
    plain.load_state_dict(torch.load(tmp_path / "dense.pth", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        assert torch.allclose(plain(x), want, atol=1e-5)
        wf, kept = to_weight_free(copy.deepcopy(net))
        assert not kept and isinstance(wf.get_submodule(attn), WeightFreeAttention)
        assert (wf(x) - want).abs().max() <= 1e-4 * want.abs().max()

    code, out, err = cli("report", dyn, "--model", factory, "--json")
    assert code == 0, err
    v = {r["name"]: r for r in json.loads(out)["layers"]}[f"{attn}.v_proj"]
    assert v["dense_flops"] == 2 * 17 * 32 * 32 and 0 < v["weightfree_flops"] < v["dense_flops"]  # 17 tokens

    for extra in ((), ("--weight-free",)):
        code, out, err = cli("export", dyn, "--model", factory, "--onnx", tmp_path / "v.onnx", "--force", *extra)
        assert code == 0, err
        assert "max abs diff" in out and (tmp_path / "v.onnx").exists()
    # factorized (bench --onnx): the projections become two thin layers inside the module-call attention
    result = dynconvert.export_onnx(dyn, tmp_path / "f.onnx", factory=factory, factorize=True)
    assert not [n for n, _ in result.kept if "self_attention" in n], result.kept


def test_vit_finetune_moves_projection_states(tmp_path, vit_checkpoint):
    from dynconvert.io.checkpoint import Source
    from dynconvert.train.finetune import FinetuneOptions, finetune_file

    pth, factory = vit_checkpoint
    conv = dynconvert.convert(_vit(), steps=5, min_params=500, input_size=(3, 32, 32),
                              source=Source("factory", factory=factory))
    dyn, out = tmp_path / "v.dyn", tmp_path / "ft.dyn"
    dynconvert.save(conv, dyn)
    q = "encoder.layers.encoder_layer_0.self_attention.q_proj"
    finetune_file(dyn, out, "digits", FinetuneOptions(max_steps=3, stop_tol=0), teacher=pth, factory=factory)
    before = dynconvert.load(dyn, factory=factory).get_submodule(q).states_in
    assert not torch.equal(before, dynconvert.load(out, factory=factory).get_submodule(q).states_in)
    assert q in read_dyn(out)[1]["finetune"]["rel_error_vs_original"]  # compared with the teacher's q rows


def _wide_vit() -> nn.Module:
    """One block wide enough (E = 256) that dynamics states are a candidate for its projections."""
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=256, mlp_dim=256, num_classes=10)
    nn.init.normal_(net.heads.head.weight, std=0.2)
    return net.eval()


def test_vit_budget_conversion_compresses_projections(tmp_path):
    """q, k, v and out_proj are budgeted like Linear layers (their inputs taken through the MHA):
    at 1/10 of the bytes, below int4 everywhere, the packed q/k/v goes below 4 bits (states or
    group-wise int3/int2); the file fits, reads back to the same model and exports to ONNX
    (checked in ONNX Runtime) once the user accepts a graph over the budget."""
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(2)]
    conv = dynconvert.convert(_wide_vit(), size=1 / 10, calib=calib, input_size=(3, 32, 32), min_params=500)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert [s.name for s in conv.skipped] == ["encoder.pos_embedding"]
    rows = {r["name"]: r for r in conv.budget["layers"]}
    assert rows[f"{attn}.{{q,k,v}}_proj"]["shape"] == [768, 256] and rows[f"{attn}.out_proj"]["kind"] != "fp32"
    assert rows[f"{attn}.{{q,k,v}}_proj"]["kind"] in ("dyn", "int3", "int2")  # the tightest layers at this budget
    if rows[f"{attn}.{{q,k,v}}_proj"]["kind"] == "dyn":  # three converted projections, fitted to their outputs
        kinds = {s.name: s.kind for s in conv.layers}
        assert all(kinds[f"{attn}.{c}"] == "mha_proj" for c in QKV)
        assert {s.name: s.fit_mode for s in conv.layers}[f"{attn}.q_proj"].startswith("outputs")
    path = tmp_path / "v.dyn"
    dynconvert.save(conv, path)
    original_bytes = sum(t.numel() * 4 for t in _wide_vit().state_dict().values())
    assert path.stat().st_size <= original_bytes / 10
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dynconvert.load(path, model=_wide_vit())(x), conv.model(x), atol=1e-5)
    # a one-block ViT's graph structure does not fit beside its weights in 1/10 of its bytes: said, not written
    with pytest.raises(DynError, match=r"the weights fit, the graph's structure \([\d,]+ B of nodes and names\) does not"):
        dynconvert.export_onnx(path, tmp_path / "v.onnx", model=_wide_vit())
    assert not (tmp_path / "v.onnx").exists()
    result = dynconvert.export_onnx(path, tmp_path / "v.onnx", model=_wide_vit(), allow_larger=True)
    assert f"{attn}.out_proj.weight" in result.quantized and result.weight_bytes <= result.budget_bytes < result.bytes


def test_vit_budget_stores_packed_projections_quantized():
    """Where q, k and v stay dense, their packed tensor is stored on one integer grid, its scales in
    the order of its 192 rows (one per row, or per group of a row)."""
    conv = dynconvert.convert(_vit(64), size=1 / 4, calib=[torch.randn(16, 3, 32, 32)], input_size=(3, 32, 32))
    key = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert conv.quantized[key]["bits"] in GROUP_BITS and conv.quantized[key]["scale"].shape[0] == 192
    assert not [s for s in conv.skipped if "self_attention" in s.name]


def test_calibrated_conversion_fits_projections_to_their_outputs():
    """Without a budget, --calib fits q, k, v and out_proj to their outputs too (not only weights)."""
    conv = dynconvert.convert(_vit(), steps=5, calib_steps=5, min_params=500, calib=[torch.randn(8, 3, 32, 32)],
                              input_size=(3, 32, 32))
    modes = {s.name: s.fit_mode for s in conv.layers}
    attn = "encoder.layers.encoder_layer_1.self_attention"
    assert all(modes[f"{attn}.{c}"] == "calibrated" for c in (*QKV, "out_proj")), modes


@pytest.mark.parametrize("batch_first", [True, False])
def test_projection_inputs_give_what_out_proj_multiplies(batch_first):
    """The context computed for out_proj (which torch's forward never calls) reproduces the MHA."""
    from dynconvert.dynamics.attention import projection_inputs

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    if not batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -2:] = True
    with torch.no_grad():
        inputs = projection_inputs(mha, (x, kv, kv), dict(key_padding_mask=pad))
        assert inputs["q_proj"] is x and inputs["k_proj"] is kv and inputs["v_proj"] is kv
        got = mha.out_proj(inputs["out_proj"])
        assert torch.allclose(got, mha(x, kv, kv, key_padding_mask=pad)[0], atol=1e-5)


class SeparateQKV(nn.Module):
    """Attention whose key/value sizes differ from the query's: q/k/v weights are separate parameters."""

    def __init__(self, e=32, kdim=24, vdim=40):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, 2, kdim=kdim, vdim=vdim, batch_first=True)
        self.kv = nn.Linear(e, kdim + vdim)
        self.split = [kdim, vdim]

    def forward(self, x):
        k, v = self.kv(x).split(self.split, dim=-1)
        return self.attn(x, k, v, need_weights=False)[0]


def test_separate_qkv_weights_budgeted_on_their_own_inputs():
    """Separate q/k/v parameters (key and value from another layer) are stored quantized each."""
    torch.manual_seed(0)
    model = SeparateQKV(128, 96, 160).eval()
    conv = dynconvert.convert(copy.deepcopy(model), size=1 / 5, calib=[torch.randn(8, 6, 128)], input_size=(3, 4, 4))
    assert all(conv.quantized[f"attn.{c}_weight"]["bits"] in GROUP_BITS for c in QKV), conv.quantized
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        want = model(x)
        assert (conv.model(x) - want).pow(2).mean() < 0.05 * want.pow(2).mean()  # int4 everywhere: ~0.012


def test_separate_qkv_weights_are_converted():
    torch.manual_seed(0)
    model = SeparateQKV().eval()
    conv = dynconvert.convert(copy.deepcopy(model), steps=20, min_params=0, input_size=(3, 4, 4))
    names = {s.name: s.matrix_shape for s in conv.layers}
    assert names["attn.q_proj"] == [32, 32] and names["attn.k_proj"] == [32, 24] and names["attn.v_proj"] == [32, 40]
    attn = conv.model.attn
    assert not any(p in attn._parameters for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = conv.model(x)
        dense = copy.deepcopy(model)  # the same attention with the materialized weights
        for c in QKV:
            getattr(dense.attn, f"{c}_weight").copy_(attn.get_submodule(c).weight)
        dense.attn.out_proj.weight.copy_(attn.out_proj.weight)
        dense.kv.weight.copy_(conv.model.kv.weight)
        assert torch.allclose(got, dense(x), atol=1e-5)
        wf, kept = to_weight_free(copy.deepcopy(conv.model))
        assert not kept and torch.allclose(wf(x), got, atol=1e-4)


class RawAttention(nn.Module):
    """A custom attention that multiplies by raw parameters: nothing dynconvert can rewrite."""

    def __init__(self, d=32):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(3))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        return self.out(torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, -1) @ v)


def test_raw_parameter_attention_is_listed_as_skipped():
    conv = dynconvert.convert(RawAttention(), steps=5, min_params=0, input_size=(3, 4, 4))
    assert [s.name for s in conv.layers] == ["out"]
    reasons = {s.name: s.reason for s in conv.skipped}
    assert set(reasons) == {"wq", "wk", "wv"}
    assert all("used directly by RawAttention.forward" in r and "left dense" in r for r in reasons.values())


@pytest.mark.parametrize("batch_first", [True, False])
def test_weight_free_attention_matches_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    wf = WeightFreeAttention(copy.deepcopy(mha))
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    if not batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -2:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for args, kwargs in (((x, x, x), {}), ((x, kv, kv), dict(key_padding_mask=pad, attn_mask=causal)),
                             ((x, kv, kv), dict(attn_mask=torch.randn(12, 5, 7), average_attn_weights=False))):
            want, want_w = mha(*args, **kwargs)
            got, got_w = wf(*args, **kwargs)
            assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-5)


def test_layers_are_found_through_the_kinds_registry():
    """--include, the ratio plan and the budget's units find layers the same way (layers.find_targets):
    an MHA's q_proj is a layer to name (it was refused: 'matches no Linear/Conv2d layer')."""
    from dynconvert.api import _check_include
    from dynconvert.budget.pipeline import find_units
    from dynconvert.dynamics.conversion import ConvertOptions, plan
    from dynconvert.errors import DynError

    block = nn.Module()
    block.mha, block.fc = nn.MultiheadAttention(32, 2), nn.Linear(32, 32)
    _check_include(block, ["mha.q_proj"])
    with pytest.raises(DynError, match="matches no Linear/Conv2d layer or attention projection"):
        _check_include(block, ["mha.nothing"])
    assert [c.name for c in plan(block, ConvertOptions(min_params=0, include=["mha.q_proj"]))[0]] == ["mha.q_proj"]
    units, _ = find_units(block)
    assert [(u.name, [p.name for p in u.parts], u.stored) for u in units] == [
        ("mha.{q,k,v}_proj", ["mha.q_proj", "mha.k_proj", "mha.v_proj"], ["mha.in_proj_weight"]),
        ("mha.out_proj", ["mha.out_proj"], ["mha.out_proj.weight"]), ("fc", ["fc"], ["fc.weight"])]
