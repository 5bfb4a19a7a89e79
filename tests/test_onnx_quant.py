"""Quantized tensors in an exported ONNX graph (deploy/onnx_quant.py): found by value whatever the
exporter did to them, stored as integers (int8, or packed nibbles for b <= 4, group-wise scales),
and folded to the float weights by a default ONNX Runtime session."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconvert.deploy.onnx_bytes import budget_check
from dynconvert.deploy.onnx_quant import pack_nibbles, quantize_graph, sources_of


class SamePad(nn.Conv2d):
    """EfficientNet's "same" conv: pads in its own forward, so the exporter renames its weight."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = SamePad(3, 16, 3, bias=False), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc, self.shared = nn.Linear(32, 10), nn.Linear(10, 10, bias=False)

    def forward(self, x):
        x = torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        t = x.flatten(2).transpose(1, 2)
        y = self.fc(self.mha(t, t, t, need_weights=False)[0].mean(1))
        return y + F.linear(y, self.shared.weight) + F.linear(y, self.shared.weight.T)  # one weight, two uses


# name -> (bits, group size or None for one scale per row): the interface's grids, b in {2, ..., 6, 8}
PLAN = {"c1.weight": (8, None), "c2.weight": (4, 16), "mha.in_proj_weight": (3, 8), "mha.out_proj.weight": (2, 32),
        "fc.weight": (4, None), "shared.weight": (8, None)}
PLAN_5_6 = dict(PLAN, **{"c2.weight": (5, 16), "mha.out_proj.weight": (6, 32)})

HALVES = ["mha.in_proj_bias"]
"""Stored as fp16: a bias, one number per row (found by exact value, not by a row's signs)."""


def hand_quantized(plan=PLAN):
    """A net whose weights lie on hand-made group grids (fp16 scales), with the .dyn-like
    metadata and stored scales ``sources_of`` reads, and BatchNorms that flip some rows' signs."""
    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-1.5, 1.5)
    described, stored = {}, {}
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, (bits, group) in plan.items():
            w = params[name]
            m = w.shape[0]
            rows = w.reshape(m, -1)
            g = group or rows.shape[1]
            top = 2 ** (bits - 1) - 1
            s = (rows.reshape(m, -1, g).abs().amax(2) / top).half().float().clamp_min(2 ** -14)
            q = torch.round(rows.reshape(m, -1, g) / s[..., None]).clamp(-top - 1, top)
            w.copy_((q * s[..., None]).reshape(w.shape))
            described[name] = {"bits": bits, "keep": [0], "shape": list(w.shape), **({"group": group} if group else {})}
            stored[f"{name}:scale"] = s.half() if group else s.reshape(m, *[1] * (w.ndim - 1))
        for name in HALVES:
            params[name].copy_(params[name].half().float())
            described[name] = {"bits": 16, "shape": list(params[name].shape)}
    return net, described, stored


def export(net, path, x):
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "b"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return onnx.load(str(path))


@pytest.mark.parametrize("plan", [PLAN, PLAN_5_6], ids=["int2-4,8", "int5,6"])
@pytest.mark.parametrize("keep_qdq", [False, True])
def test_group_quantized_weights_leave_as_integers_and_fold_at_load(tmp_path, keep_qdq, plan):
    net, described, stored = hand_quantized(plan)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    graph = export(net, tmp_path / "f.onnx", x)
    sources = sources_of(net.state_dict(), stored, described)
    assert sorted(s.name for s in sources) == sorted([*plan, *HALVES])
    if keep_qdq:
        graph = onnx.version_converter.convert_version(graph, 21)
    structure = sum(n.ByteSize() for n in graph.graph.node)
    res = quantize_graph(graph, sources, keep_qdq)
    assert sorted(res.stored) == sorted([*plan, *HALVES])  # renamed (BN folded), transposed, packed: every one found
    # the unpacking nodes are bytes the user ships too: few nodes, short names (was 1.2-1.7 kB a tensor)
    added = sum(n.ByteSize() for n in graph.graph.node) - structure
    assert added <= 400 * sum(len(v) for v in res.stored.values()), added
    assert len(res.stored["shared.weight"]) == 2  # W and W.T are two initializers
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(tmp_path / "q.onnx"))
    total, grew = budget_check(graph, net, stored, {"layers": {}, "quantized": described})
    assert not [g for g in grew if "float in the graph" in g], grew
    for src in [s for s in sources if s.bits < 16] if not keep_qdq else []:  # packed, fp16 group scales: the .dyn's bytes (+ fp32 row factors); QDQ scales are fp32
        assert res.onnx_bytes[src.name] <= len(res.stored[src.name]) * (src.dyn_bytes + 4 * src.q.shape[0]) + 64
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    ran = onnx.load(str(tmp_path / "opt.onnx")).graph
    kinds = {n.op_type for n in ran.node}
    if keep_qdq:
        assert "DequantizeLinear" in kinds
    else:  # a default session folded every integer initializer to float at load
        assert not kinds & {"DequantizeLinear", "Mod", "BitShift"}, kinds
        assert all(i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for i in ran.initializer)


def test_float_copy_of_a_quantized_weight_is_named(tmp_path):
    """The check that fails an export: a quantized weight left float in the graph is named, by value."""
    net, described, stored = hand_quantized()
    graph = export(net, tmp_path / "f.onnx", torch.randn(1, 3, 8, 8))
    sources = [s for s in sources_of(net.state_dict(), stored, described) if s.name != "c2.weight"]
    quantize_graph(graph, sources)
    _, grew = budget_check(graph, net, stored, {"layers": {}, "quantized": described})
    assert grew == ["c2.weight: stored as integers in the .dyn but float in the graph"]


def test_fp16_biases_are_found_each_by_its_own_value(tmp_path):
    """Two biases of one length stored as fp16: a row of one number matches any other up to a
    factor, so each must be found by its exact value (ViT-B/16's biases left the graph as float)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 300)).eval()
    described = {}
    with torch.no_grad():
        for name in ("0.bias", "2.bias"):
            p = net.get_parameter(name)
            p.copy_(p.abs().half().float())  # one sign: every entry shares the sign key
            described[name] = {"bits": 16, "shape": list(p.shape)}
    graph = export(net, tmp_path / "f.onnx", torch.randn(2, 64))
    res = quantize_graph(graph, sources_of(net.state_dict(), {}, described))
    assert sorted(res.stored) == ["0.bias", "2.bias"] and not res.float_left, (res.stored, res.float_left)
    _, grew = budget_check(graph, net, {}, {"layers": {}, "quantized": described})
    assert not grew, grew


def test_keep_qdq_is_checked_with_float_activations(tmp_path):
    """An opset-21 QDQ graph: ONNX Runtime's default session fuses DequantizeLinear + MatMul into
    MatMulNBits with int8 activations (its integer kernel, what --keep-qdq is for), so the export
    checks the graph with float activations (exact) and reports the default session beside it."""
    from dynconvert.deploy.export import FLOAT_MATMULNBITS, session_outputs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    described, stored = {}, {}
    with torch.no_grad():
        for name in ("0.weight", "2.weight"):
            w = net.get_parameter(name)
            s = w.abs().amax(1, keepdim=True) / 127
            w.copy_(torch.round(w / s) * s)
            described[name], stored[f"{name}:scale"] = {"bits": 8, "keep": [0]}, s
    x = torch.randn(2, 16, 64)  # tokens: the Linear exports as MatMul, as in a ViT
    with torch.no_grad():
        want = net(x).numpy()
    graph = onnx.version_converter.convert_version(export(net, tmp_path / "f.onnx", x), 21)
    assert sorted(quantize_graph(graph, sources_of(net.state_dict(), stored, described), True).stored) == ["0.weight", "2.weight"]
    onnx.save(graph, str(tmp_path / "q.onnx"))
    exact = np.abs(session_outputs(tmp_path / "q.onnx", x.numpy(), [FLOAT_MATMULNBITS])[0] - want).max()
    default = np.abs(session_outputs(tmp_path / "q.onnx", x.numpy())[0] - want).max()
    assert exact <= 1e-5 * np.abs(want).max(), exact
    assert default > 10 * exact, (default, exact)  # int8 activations; if a runtime stops fusing, this says so


@pytest.mark.parametrize("slot", [2, 4])
def test_pack_nibbles_layout(slot):
    q = np.array([-2, -1, 0, 1, 1], np.int8) if slot == 2 else np.array([-8, -1, 0, 7, 3], np.int8)  # padded
    packed = pack_nibbles(q, slot)
    assert packed.size == -(-q.size * slot // 8)
    parts = [(packed >> (slot * j)) % (1 << slot) for j in range(8 // slot)]
    assert (np.concatenate(parts).astype(np.int16) - (1 << (slot - 1)))[:5].tolist() == q.tolist()
