"""Attention projections: ``nn.MultiheadAttention``'s weights that are parameters, not Linear modules.

An MHA holds its input projection as the packed parameter ``in_proj_weight`` (3E x E: q, k and v
stacked), or, when key/value sizes differ (``_qkv_same_embed_dim=False``), as ``q_proj_weight``,
``k_proj_weight`` and ``v_proj_weight``. Either way q, k and v are converted as three matrices
(``DynProj``: bias-free ``DynLinear``s) that become children of the MHA named ``q_proj``,
``k_proj`` and ``v_proj``, and the MHA's class is swapped for a subclass whose projection weights
read the children's materialized weights (a packed MHA drops ``in_proj_weight`` once all three are
converted). PyTorch's own forward, fast path included, then runs unchanged, and fine-tuning
reaches the states through it.

Three rather than one packed matrix: at equal state parameters three E x E fits have the lower
error (ViT-B/16 block 0, ratio 0.25: 0.7989 vs 0.8043; truncated SVD shows the same gap, and so
does a small ViT trained on digits; ``benchmarks/attention_split.py``).

``WeightFreeAttention`` is the MHA forward for inference written with module calls (q/k/v
children, ``out_proj``), so that weight-free layers, which have no ``.weight``, can sit in it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import DynLinear, DynSpec

QKV = ("q_proj", "k_proj", "v_proj")


def packed(mha: nn.Module) -> bool:
    return bool(getattr(mha, "_qkv_same_embed_dim", True))


def dense_proj(mha: nn.MultiheadAttention, child: str) -> torch.Tensor | None:
    """The dense weight of projection ``child`` (q_proj, k_proj or v_proj) while it is a parameter
    (for a packed MHA, its third of ``in_proj_weight``); None once converted or absent."""
    if child not in QKV or child in mha._modules:
        return None
    if not packed(mha):
        w = mha._parameters.get(f"{child}_weight")
        return w if isinstance(w, torch.Tensor) else None
    w = mha._parameters.get("in_proj_weight")
    if not isinstance(w, torch.Tensor):
        return None
    e = mha.embed_dim
    i = QKV.index(child)
    return w[i * e:(i + 1) * e]


def proj_weight(mha: nn.MultiheadAttention, child: str) -> torch.Tensor:
    """The current (m, n) weight of q/k/v projection ``child``: its converted child's, or the dense one."""
    module = mha._modules.get(child)
    return module.weight if module is not None else dense_proj(mha, child)


class ConvertedAttentionMixin:
    """Projection weights read from converted children where there are some, else the parameters."""

    original_class: type

    def _proj(self, child: str):
        return proj_weight(self, child)

    @property
    def in_proj_weight(self):
        if not packed(self):
            return self._parameters.get("in_proj_weight")
        return torch.cat([self._proj(c) for c in QKV])

    q_proj_weight = property(lambda self: None if packed(self) else self._proj("q_proj"))
    k_proj_weight = property(lambda self: None if packed(self) else self._proj("k_proj"))
    v_proj_weight = property(lambda self: None if packed(self) else self._proj("v_proj"))


class ConvertedMultiheadAttention(ConvertedAttentionMixin, nn.MultiheadAttention):
    original_class = nn.MultiheadAttention


_CLASSES: dict[type, type] = {nn.MultiheadAttention: ConvertedMultiheadAttention}


def converted_class(cls: type) -> type:
    """The converted twin of an MHA class (made once for a subclass of nn.MultiheadAttention)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Converted{cls.__name__}", (ConvertedAttentionMixin, cls), {"original_class": cls})
    return _CLASSES[cls]


class ProjTarget(nn.Module):
    """A projection of an MHA seen as a dense layer (``.weight``), for planning and fitting.

    Not part of the model: the owner is held outside the module tree, so nothing is registered twice.
    Hooks on it never fire (the MHA does not call it): its inputs are taken through the MHA (``input_taps``).
    """

    def __init__(self, owner: nn.MultiheadAttention, child: str):
        super().__init__()
        self.__dict__["owner"] = owner
        self.child = child
        self.__dict__["weight"] = dense_proj(owner, child)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def proj_targets(name: str, module: nn.Module) -> list[tuple[str, ProjTarget]]:
    """The q, k and v projections of an MHA that are still dense."""
    if not isinstance(module, nn.MultiheadAttention):
        return []
    prefix = f"{name}." if name else ""
    return [(prefix + c, ProjTarget(module, c)) for c in QKV if dense_proj(module, c) is not None]


def find_proj_target(parent: nn.Module, child: str) -> ProjTarget | None:
    """The dense projection ``child`` of ``parent``, or None when it has none."""
    if isinstance(parent, nn.MultiheadAttention) and dense_proj(parent, child) is not None:
        return ProjTarget(parent, child)
    return None


class DynProj(DynLinear):
    """A converted projection weight of an MHA (no bias: the MHA keeps ``in_proj_bias``)."""

    def __init__(self, in_features: int, out_features: int, spec: DynSpec):
        super().__init__(in_features, out_features, False, spec)

    @classmethod
    def from_dense(cls, target: ProjTarget, spec: DynSpec) -> "DynProj":
        return cls(target.in_features, target.out_features, spec)

    def install_into(self, parent: nn.Module, child: str) -> None:
        """Put this layer in place of the MHA weight it replaces (see the module docstring)."""
        if not isinstance(parent, nn.MultiheadAttention) or child not in QKV:
            raise TypeError(f"a converted projection goes into an nn.MultiheadAttention, not {type(parent).__name__}")
        if not isinstance(parent, ConvertedAttentionMixin):
            parent.__class__ = converted_class(type(parent))
        parent._modules[child] = self
        if not packed(parent):
            parent._parameters.pop(f"{child}_weight", None)
        elif all(c in parent._modules for c in QKV):  # the packed parameter goes once all three are states
            parent._parameters.pop("in_proj_weight", None)

    def to_dense(self) -> "DenseProj":
        return DenseProj(self.weight.detach().clone())


class DenseProj(nn.Module):
    """The materialized weight of a ``DynProj``; installing it restores the plain MHA parameter."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def install_into(self, parent: nn.Module, child: str) -> None:
        if packed(parent):
            stacked = parent.in_proj_weight.detach().clone()  # from the children still converted
            parent._modules.pop(child, None)
            parent._parameters["in_proj_weight"] = nn.Parameter(stacked)
        else:
            parent._modules.pop(child, None)
            parent._parameters[f"{child}_weight"] = self.weight
        if isinstance(parent, ConvertedAttentionMixin) and not any(c in parent._modules for c in QKV):
            parent.__class__ = type(parent).original_class


# ---------------------------------------------------------------- weight-free forward


def weight_free_attention_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``WeightFreeAttention`` cannot stand in for ``mha``, or None."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv/add_zero_attn attention has no weight-free forward"
    return None


class WeightFreeAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward at inference, through module calls: every projection is a
    child module (a weight-free one, a ``DynProj`` or a plain ``Linear`` holding the dense weight)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        why = weight_free_attention_unsupported(mha)
        if why:
            raise ValueError(why)
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        for child in QKV:
            module = mha._modules.get(child)
            if module is None:  # still a dense parameter
                w = dense_proj(mha, child).detach()
                module = nn.Linear(w.shape[1], w.shape[0], bias=False)
                module.weight = nn.Parameter(w.clone(), requires_grad=False)
            self.add_module(child, module)
        self.in_proj_bias = None if mha.in_proj_bias is None else nn.Parameter(mha.in_proj_bias.detach().clone(),
                                                                                requires_grad=False)
        self.out_proj = mha.out_proj

    def _project(self, query, key, value):
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.in_proj_bias is not None:
            e, b = self.embed_dim, self.in_proj_bias
            q, k, v = q + b[:e], k + b[e:2 * e], v + b[2 * e:]
        return q, k, v

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        context, attn = attend(query, key, value, self._project, self.num_heads, self.batch_first,
                               key_padding_mask, attn_mask, is_causal)
        out = self.out_proj(context)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        return out, weights


def attend(query, key, value, project, num_heads: int, batch_first: bool, key_padding_mask=None, attn_mask=None,
           is_causal=False):
    """Multi-head attention up to (not including) the output projection: (the heads' outputs
    concatenated, in the inputs' layout; the attention weights (N, h, Lq, Lk)).
    ``project(query, key, value)`` gives the batch-first q, k, v (input projections and biases)."""
    if not batch_first:  # (L, N, E) -> (N, L, E), keeping self-attention's inputs one tensor
        same = query is key and key is value
        query = query.transpose(0, 1)
        key, value = (query, query) if same else (key.transpose(0, 1), value.transpose(0, 1))
    q, k, v = project(query, key, value)
    n, lq, e = q.shape
    h, hd = num_heads, e // num_heads
    q, k, v = (t.reshape(n, -1, h, hd).transpose(1, 2) for t in (q, k, v))  # (N, h, L, hd)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
    mask = _merged_mask(attn_mask, key_padding_mask, is_causal, lq, k.shape[2], scores)
    if mask is not None:
        scores = scores + mask
    attn = torch.softmax(scores, dim=-1)
    context = torch.matmul(attn, v).transpose(1, 2).reshape(n, lq, e)
    return (context if batch_first else context.transpose(0, 1)), attn


def _merged_mask(attn_mask, key_padding_mask, is_causal, lq, lk, like):
    """One additive float mask (broadcast to (N, h, Lq, Lk)) from MHA's mask arguments."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=like.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, like)
        if mask.dim() == 3:  # (N*h, Lq, Lk)
            mask = mask.reshape(-1, like.shape[1], lq, lk)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, like)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = not attended) as -inf/0; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def with_module_calls(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.MultiheadAttention`` (that has a module-call form) replaced, in
    place, by ``WeightFreeAttention`` over its current projections: the same outputs, but each
    projection runs as a module, so FLOP counters and hooks see it (PyTorch's fast path counts
    nothing and calls none)."""
    for name, mha in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]:
        if weight_free_attention_unsupported(mha) is None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, WeightFreeAttention(mha))
    return model


# ---------------------------------------------------------------- what each projection multiplies

PROJS = QKV + ("out_proj",)
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def projection_inputs(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, context: bool = True) -> dict:
    """The tensor each projection of one ``mha(*args, **kwargs)`` call multiplies, in the caller's
    layout: q/k/v_proj their query/key/value (one tensor object for self-attention), and, with
    ``context``, out_proj the heads' outputs before it. That one is computed here (``attend`` with
    the MHA's current weights): torch's forward never calls out_proj as a module, it reads
    ``out_proj.weight`` inside ``F.multi_head_attention_forward``, so no hook on out_proj fires."""
    call = dict(zip(_MHA_ARGS, args), **kwargs)
    query, key, value = call["query"], call["key"], call["value"]
    out = {"q_proj": query, "k_proj": key, "v_proj": value}
    if context and query.dim() == 3 and weight_free_attention_unsupported(mha) is None:
        e, bias = mha.embed_dim, mha.in_proj_bias

        def project(*xs):
            return [F.linear(x, proj_weight(mha, c), None if bias is None else bias[i * e:(i + 1) * e])
                    for i, (c, x) in enumerate(zip(QKV, xs))]

        out["out_proj"] = attend(query, key, value, project, mha.num_heads, mha.batch_first,
                                 call.get("key_padding_mask"), call.get("attn_mask"), call.get("is_causal", False))[0]
    return out


@contextlib.contextmanager
def input_taps(model: nn.Module, names, fn):
    """While inside, ``fn(names, layer, x)`` is called with the input ``x`` of the named layers each
    time a forward uses them: ``names`` are the layers multiplying this same tensor (an MHA's q, k
    and v in self-attention: one call, so it is processed once), ``layer`` the module (None for an
    MHA projection: a linear map of x's last dimension).

    A layer the forward calls is tapped by a forward pre-hook; the projections of an
    ``nn.MultiheadAttention`` (q/k/v_proj, dense or converted, and out_proj: the MHA calls none of
    them) by a pre-hook on the MHA that works out their inputs (``projection_inputs``). ``fn`` may
    raise to end the forward early."""
    handles, by_mha = [], {}
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(parent, nn.MultiheadAttention) and child in PROJS:
                by_mha.setdefault(parent_name, (parent, {}))[1][child] = name
            else:
                handles.append(model.get_submodule(name).register_forward_pre_hook(
                    lambda module, args, n=name: fn([n], module, args[0])))
        for mha, wanted in by_mha.values():
            def hook(module, args, kwargs, wanted=wanted):
                inputs = projection_inputs(module, args, kwargs, context="out_proj" in wanted)
                groups: dict[int, tuple] = {}
                for child, name in wanted.items():
                    if child in inputs:
                        groups.setdefault(id(inputs[child]), (inputs[child], []))[1].append(name)
                for x, group in groups.values():
                    fn(group, None, x)
            handles.append(mha.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
