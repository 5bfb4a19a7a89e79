"""Run a network from one block on, the blocks before it answering with outputs recorded once.

Measuring a candidate (pipeline.measure_candidates) changes one layer and runs the network on
the same images again; everything upstream of that layer's block computes exactly what the
reference pass computed. ``Suffix`` records, on the reference pass, the output of every block
(blocks.find_blocks: a residual/MBConv block, a transformer layer, a lone stem or head
layer) called exactly once, and while ``Suffix.from_layer(name)`` is active each block that ran
before the named layer's block returns a copy of its recorded output instead of computing it.
The outputs are the same numbers as a full pass, and the upstream compute is skipped: half of
it on average, most of it in a CNN whose early blocks run at high resolution.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .blocks import find_blocks


class Suffix:
    def __init__(self, model: nn.Module, layers, images: torch.Tensor):
        """Runs ``model(images)`` once (the reference pass); ``self.reference`` is its output. The
        records take each block's output bytes (ViT-B/16, 16 images: 10 MB a block)."""
        names = find_blocks(model, layers)
        modules = dict(model.named_modules())
        calls: dict[str, list] = {n: [] for n in names}
        order: list[str] = []

        def hook(name):
            def record(mod, args, out):
                calls[name].append(out)
                order.append(name)
            return record

        hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
        try:
            with torch.no_grad():
                self.reference = model(images)
        finally:
            for h in hooks:
                h.remove()
        # only blocks called once with a plain tensor out can stand in for themselves (and a
        # scripted module takes no stand-in forward)
        once = [n for n in dict.fromkeys(order) if len(calls[n]) == 1 and isinstance(calls[n][0], torch.Tensor)
                and not isinstance(modules[n], torch.jit.ScriptModule)]
        self.order = once
        self.outputs = {n: calls[n][0] for n in once}
        self.modules = {n: modules[n] for n in once}

    def block_index(self, layer: str) -> int | None:
        """The position (in execution order) of the recorded block holding ``layer``."""
        for i, n in enumerate(self.order):
            if layer == n or layer.startswith(n + "."):
                return i
        return None

    @contextmanager
    def from_layer(self, layers):
        """While active, the blocks executed before the first block of ``layers`` are not computed.
        A layer outside every recorded block: everything is computed, as without this."""
        where = [self.block_index(n) for n in layers]
        start = 0 if any(i is None for i in where) else min(where)
        stubbed = self.order[:start]
        for n in stubbed:  # a copy: code after a block may change its output in place
            self.modules[n].forward = lambda *a, _out=self.outputs[n], **k: _out.clone()
        try:
            yield
        finally:
            for n in stubbed:
                del self.modules[n].forward
