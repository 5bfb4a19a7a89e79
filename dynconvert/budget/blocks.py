"""The blocks of a network and what flows through them, for the block-wise reconstruction
(reconstruct.py) and the candidate measurement from a block on (suffix.py).

**Blocks.** Walking down from the root, a child of an ``nn.Sequential``/``nn.ModuleList`` that
holds a compressed layer is a block (a residual/MBConv block, a transformer encoder layer), and
the walk does not descend into it; a container inside a container (torchvision's stages) is
walked through. A compressed layer outside every block (a stem conv, a head conv, a classifier)
is a block by itself. Blocks are visited in execution order; a block called other than exactly
once per forward pass is left alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

CONTAINERS = (nn.Sequential, nn.ModuleList)


def find_blocks(model: nn.Module, layers) -> list[str]:
    """The blocks holding the named ``layers`` (see the module doc), in module order."""
    layers = set(layers)
    blocks: list[str] = []

    def holds(name: str) -> bool:
        return any(n == name or n.startswith(name + ".") for n in layers)

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not holds(full):
                continue
            if full in layers or (isinstance(module, CONTAINERS) and not isinstance(child, CONTAINERS)):
                blocks.append(full)
            else:
                walk(full, child)

    walk("", model)
    return blocks


class _Stop(Exception):
    pass


@torch.no_grad()
def trace(model: nn.Module, names: list[str], x: torch.Tensor):
    """Per block: (called exactly once with one tensor, its input is the tensor the previous block
    returned, its keyword arguments)."""
    modules = dict(model.named_modules())
    calls: dict[int, list] = {}
    last: dict[int, torch.Tensor] = {}
    hooks = []
    for i, n in enumerate(names):
        def pre(mod, args, kwargs, i=i):
            plain = len(args) == 1 and not any(isinstance(v, torch.Tensor) for v in kwargs.values())
            calls.setdefault(i, []).append((plain, plain and i > 0 and args[0] is last.get(i - 1), dict(kwargs)))

        def post(mod, args, kwargs, out, i=i):
            last[i] = out
        hooks += [modules[n].register_forward_pre_hook(pre, with_kwargs=True),
                  modules[n].register_forward_hook(post, with_kwargs=True)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [calls[i][0] if len(calls.get(i, [])) == 1 else (False, False, {}) for i in range(len(names))]


@torch.no_grad()
def block_io(model: nn.Module, block: nn.Module, images: torch.Tensor, batch: int = 32):
    """The block's inputs and outputs over ``images`` (each forward pass stops after the block)."""
    ins, outs = [], []
    for x in images.split(batch):
        got = {}

        def pre(mod, args, kwargs):
            got["in"] = args[0]

        def post(mod, args, kwargs, out):
            got["out"] = out
            raise _Stop

        hooks = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
        try:
            model(x)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        ins.append(got["in"])
        outs.append(got["out"])
    return torch.cat(ins), torch.cat(outs)


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, batch: int = 32) -> torch.Tensor:
    """The block's outputs on its inputs ``x`` (with the keyword arguments ``trace`` found)."""
    return torch.cat([block(b, **kwargs) for b in x.split(batch)])


def rel_error(y: torch.Tensor, target: torch.Tensor) -> float | None:
    """Mean squared error of ``y`` over the mean square of ``target`` (None for no rows)."""
    return float((y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)) if len(y) else None
