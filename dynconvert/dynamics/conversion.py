"""Model surgery: choose layers and budgets, fit their states, swap in dynamics-based layers."""

from __future__ import annotations

import fnmatch
import functools
import math
import zlib
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from .calibration import input_moments, input_whitener, layer_inputs, output_error  # noqa: F401 (layer_inputs: its old place)
from .modules import DynSpec, choose_spec, dense_matrix, materialize, set_submodule  # noqa: F401 (set_submodule: its old place)
from ..errors import DynError
from .fit import FitResult, fit_weight, refine_on_outputs, svd_rel_error, svd_truncate
from .layers import LayerKind, dense_kind, find_targets, make_dynamic, uncovered_parameters
from .workers import in_order, one_thread
from .workers import threads as worker_threads


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides a conversion; recipes and CLI flags fill it. The one source of the
    defaults: the CLI and recipes only override them (``dataclasses.replace``)."""

    ratio: float = 0.25
    min_params: int = 10_000
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    metric: str = "sql2"
    kernel: str = "linear"
    max_dim: int = 4
    groups: int | None = None
    dim: int | None = None
    steps: int = 300
    lr: float = 0.05
    calib_steps: int = 300
    init: str = "svd"
    seed: int = 0
    device: str = "cpu"
    quant_group: int | None = None
    """Byte budgets: inputs per fp16 scale of the int4/int3/int2 candidates (None: the divisor of
    each row's length nearest 64 in [32, 128]; where it does not divide, one scale per channel)."""
    layers: dict = field(default_factory=dict)
    """Per-layer overrides: glob pattern on layer names -> {field: value} for the fields in
    LAYER_FIELDS (what a layer becomes and how it is fitted); where several patterns match a layer,
    later ones win. Recipes (``[layers."fc"]``) and Python callers fill it."""

    def for_layer(self, name: str) -> "ConvertOptions":
        """The options that apply to layer ``name``: these, with the matching overrides applied."""
        merged = {}
        for pattern, values in self.layers.items():
            if fnmatch.fnmatchcase(name, pattern):
                merged.update(values)
        return replace(self, layers={}, **merged) if merged else self

    def validate(self) -> None:
        if not isinstance(self.layers, dict):
            raise DynError("per-layer options must map a layer-name pattern to {option: value}")
        for pattern, values in self.layers.items():
            unknown = [k for k in values if k not in LAYER_FIELDS] if isinstance(values, dict) else ["(not a table)"]
            if unknown:
                raise DynError(f"per-layer options for {pattern!r}: {unknown[0]} cannot be set per layer "
                               f"(these can: {', '.join(LAYER_FIELDS)})")
            replace(self, layers={}, **values).validate()
        if not 0 < self.ratio <= 1:
            raise DynError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.steps < 0 or self.calib_steps < 0 or self.max_dim < 1 or self.min_params < 0 or not 0 < self.lr < math.inf:
            raise DynError("steps, calib_steps and min_params must be >= 0, max_dim >= 1 and lr a finite number > 0")
        if (self.groups is None) != (self.dim is None):
            raise DynError("give both --groups and --dim, or neither (then --ratio decides)")
        if self.groups is not None and min(self.groups, self.dim) < 1:
            raise DynError(f"--groups and --dim must be >= 1, got {self.groups} and {self.dim}")
        try:
            DynSpec(self.groups or 1, self.dim or 1, self.metric, self.kernel)
        except ValueError as e:
            raise DynError(str(e)) from None
        if self.quant_group is not None and (type(self.quant_group) is not int or self.quant_group <= 0):
            raise DynError(f"--quant-group {self.quant_group!r} must be a positive number of inputs per scale (e.g. 64)")
        if self.init not in ("svd", "random"):
            raise DynError(f"init must be 'svd' or 'random', got {self.init!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DynError(f"device {self.device!r} was requested but no CUDA device is available; use --device cpu")

    def to_dict(self) -> dict:
        return asdict(self)


LAYER_FIELDS = ("ratio", "min_params", "metric", "kernel", "max_dim", "groups", "dim", "steps", "lr", "calib_steps",
                "init")


@dataclass
class Planned:
    name: str
    layer: nn.Module  # the dense layer (or MHA projection, layers.ProjTarget) to convert
    spec: DynSpec
    kind: LayerKind | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            self.kind = dense_kind(self.layer)


@dataclass
class Skipped:
    name: str
    reason: str


def matches(name: str, patterns) -> bool:
    """Whether a layer name matches any of the --include/--exclude glob patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(model: nn.Module, opts: ConvertOptions) -> tuple[list[Planned], list[Skipped]]:
    """Which weights get converted (every kind in ``layers.KINDS``), with which spec, and why the
    others do not: each skipped weight, and each matrix-like parameter no kind covers, is listed."""
    chosen, skipped = [], []
    for name, kind, layer in find_targets(model):
        if opts.include and not matches(name, opts.include):
            continue
        if matches(name, opts.exclude):
            skipped.append(Skipped(name, "excluded by pattern"))
            continue
        spec = layer_spec(kind, layer, opts.for_layer(name))
        if isinstance(spec, str):
            skipped.append(Skipped(name, spec))
            continue
        chosen.append(Planned(name, layer, spec, kind))
    skipped += uncovered_skips(model, opts.include, opts.exclude)
    return chosen, skipped


def layer_spec(kind: LayerKind, layer: nn.Module, opts: ConvertOptions) -> DynSpec | str:
    """The spec ``layer`` converts at under ``opts`` (its per-layer options), or why it is not converted."""
    if why := kind.why_not(layer):
        return why
    m, n = dense_matrix(layer).shape
    if m * n < opts.min_params:
        return f"{m * n} weights < min_params {opts.min_params}"
    if opts.groups is not None:
        spec = DynSpec(opts.groups, opts.dim, opts.metric, opts.kernel)
        if spec.state_params(m, n) >= m * n:
            return f"H={opts.groups}, d={opts.dim} would not save parameters"
        return spec
    spec = choose_spec(m, n, opts.ratio, opts.max_dim, opts.metric, opts.kernel)
    return spec if spec is not None else f"no state budget fits ratio {opts.ratio}"


def uncovered_skips(model: nn.Module, include=(), exclude=()) -> list[Skipped]:
    """Matrix-like parameters no layer kind converts, as skipped entries (never silently dense)."""
    return [Skipped(name, why) for name, why in uncovered_parameters(model)
            if (not include or matches(name, include)) and not matches(name, exclude)]


@dataclass
class LayerStats:
    """Per-layer figures recorded in the .dyn and shown by report."""

    name: str
    kind: str
    weight_shape: list[int]
    matrix_shape: list[int]
    spec: dict
    dense_params: int
    state_params: int
    rel_error: float
    svd_rel_error: float
    svd_rank: int
    steps: int
    fit_mode: str = "weights"
    output_rel_error: float | None = None
    svd_output_rel_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.state_params / self.dense_params


class ConvertCallbacks:
    """Progress hooks; the CLI renders them with rich. All do nothing by default."""

    def layer_start(self, index: int, total: int, item: Planned) -> None: ...
    def step(self, step: int, steps: int, rel_error: float) -> None: ...
    def layer_done(self, index: int, total: int, stats: LayerStats, fit: FitResult) -> None: ...


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed that depends only on the run's seed and the layer's name (stable under resume)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@dataclass
class LayerJob:
    """One layer's fit, as sent to a worker process: everything it needs, nothing it does not."""

    name: str
    matrix: torch.Tensor
    spec: DynSpec
    opts: ConvertOptions
    moment: torch.Tensor | None = None
    done: FitResult | None = None  # from an interrupted run: only its figures are computed


def fit_layer(job: LayerJob, on_step=None) -> tuple[FitResult, dict]:
    """Fit one layer (unless ``job.done``) and measure it against truncated SVD: (fit, figures).

    Runs on one thread wherever it runs, so the result is the same in any process (workers.py).
    """
    opts, matrix, spec = job.opts, job.matrix, job.spec
    fit = job.done
    if fit is None:
        fit = fit_weight(
            matrix, spec, steps=opts.steps, lr=opts.lr, seed=layer_seed(opts.seed, job.name),
            device=opts.device, name=job.name, on_step=on_step, init=opts.init,
        )
        if job.moment is not None:
            fit = refine_on_outputs(
                fit, matrix, spec, job.moment, steps=opts.calib_steps, device=opts.device, name=job.name, on_step=on_step,
            )
    figures = {"svd_rel_error": svd_rel_error(matrix, spec.rank_budget)}
    if job.moment is not None:
        whitener = input_whitener(job.moment)  # the L refine_on_outputs fitted with
        left, right = svd_truncate(matrix, spec.rank_budget)
        approx = materialize(fit.states_out, fit.states_in, fit.coupling, fit.offset, spec.metric, spec.kernel)
        figures["output_rel_error"] = output_error(matrix, approx, whitener=whitener)
        figures["svd_output_rel_error"] = output_error(matrix, left @ right, whitener=whitener)
    return fit, figures


def convert_model(
    model: nn.Module,
    opts: ConvertOptions,
    callbacks: ConvertCallbacks | None = None,
    done: dict[str, FitResult] | None = None,
    calib=None,
    threads: int | None = None,
) -> tuple[nn.Module, list[LayerStats], list[Skipped]]:
    """Convert ``model`` in place. ``done`` holds fits from an interrupted run, reused as they are.

    ``calib``: an iterable of input batches (or (input, label) pairs). With it, each layer is
    fitted to its weights first and then to its outputs on these inputs (``refine_on_outputs``).

    ``threads``: fit up to that many layers at once, each in a one-thread worker process
    (default: ``workers.threads()``). The result is byte-for-byte the same for every count.
    On a GPU the layers are fitted one after the other here. Callbacks: ``layer_start`` and
    ``layer_done`` come in layer order; ``step`` only when fitting here (one worker).
    """
    opts.validate()
    cb = callbacks or ConvertCallbacks()
    chosen, skipped = plan(model, opts)
    workers = 1 if opts.device != "cpu" else (threads or worker_threads())
    with one_thread():  # the calibration pass too: its sums must not depend on the thread count
        moments = input_moments(model, {c.name: c.layer for c in chosen}, calib) if calib is not None else {}
    jobs = [LayerJob(c.name, dense_matrix(c.layer).detach(), c.spec, opts.for_layer(c.name), moments.get(c.name),
                     (done or {}).get(c.name)) for c in chosen]
    fitter = functools.partial(fit_layer, on_step=cb.step) if workers <= 1 else fit_layer
    stats = []
    with in_order(fitter, jobs, workers) as results:
        for i, (item, job) in enumerate(zip(chosen, jobs)):
            cb.layer_start(i, len(chosen), item)
            fit, figures = next(results)
            new = make_dynamic(item.layer, item.spec)
            new.set_states(fit.states_out, fit.states_in, fit.coupling, fit.offset)
            set_submodule(model, item.name, new)
            m, n = job.matrix.shape
            s = LayerStats(
                name=item.name, kind=item.kind.name,
                weight_shape=list(item.layer.weight.shape), matrix_shape=[m, n], spec=item.spec.to_dict(),
                dense_params=m * n, state_params=new.num_state_params(), rel_error=fit.rel_error,
                svd_rel_error=figures["svd_rel_error"], svd_rank=item.spec.rank_budget, steps=fit.steps,
            )
            if job.moment is not None:
                s.fit_mode = "calibrated"
                s.output_rel_error = figures["output_rel_error"]
                s.svd_output_rel_error = figures["svd_output_rel_error"]
            stats.append(s)
            cb.layer_done(i, len(chosen), s, fit)
    return model, stats, skipped
