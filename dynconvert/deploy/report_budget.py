"""The byte budget's part of a report: the allocation table (one row per budgeted layer, its
choice, bytes and measured error), its title with the block reconstruction's line, and the
layers-per-choice lines (report.py renders the rest)."""

from __future__ import annotations

from ..budget.pipeline import choice_lines


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


NARROW = 120  # below this many columns the per-layer tables keep only what fits without cutting cells


BUDGET_COLUMNS = ("layer", "matrix", "chosen", "bytes", "fp32 bytes", "sensitivity", "measured err", "why")


def budget_rows(rep: dict) -> list[list[str]]:
    return [[r["name"], "x".join(map(str, r["shape"])), r["choice"], human(r["bytes"], "B"), human(r["fp32_bytes"], "B"),
             f"{r['sensitivity']:.3g}", f"{r['predicted_error']:.3g}", r["why"]] for r in rep["budget"]["layers"]]


def budget_title(rep: dict) -> str:
    b = rep["budget"]
    return (f"allocation: budget {human(b['target_bytes'], 'B')} of {human(b['original_bytes'], 'B')}, planned "
            f"{human(b['planned_bytes'], 'B')}; calibration {b['calibration']} ({b['calibration_images']} images); "
            f"the choices minimize the summed network-output errors measured for each layer alone"
            + _reconstruction_note(b.get("reconstruction")))


def _reconstruction_note(r: dict | None) -> str:
    """The block-wise reconstruction's line of the allocation title (budget/reconstruct.py)."""
    if not r:
        return ""
    if not r["blocks"]:
        n = r.get("int8_only", 0)
        return "; no block reconstruction: " + (f"all {n} blocks hold 8-bit weights only" if n else
                                                 "no block is called exactly once per pass")
    held = (f", held apart ({r['held_apart']} images) {r['mean_held_before']:.3g} -> {r['mean_held_after']:.3g}"
            if r.get("mean_held_before") is not None else "")
    return (f"; then block reconstruction ({r['iters']} steps): {r['kept']} of {r['blocks']} blocks kept, mean block "
            f"output error {r['mean_fit_before']:.3g} -> {r['mean_fit_after']:.3g}{held}"
            + (f"; {r['int8_only']} blocks of 8-bit weights only left as fitted" if r.get("int8_only") else ""))


def render_budget_rich(rep: dict, console) -> None:
    from rich import box
    from rich.table import Table

    keep = (0, 2, 3, 6, 7) if console.width < NARROW else range(len(BUDGET_COLUMNS))  # narrow: no matrix/fp32/sensitivity
    table = Table(title=budget_title(rep), box=box.SIMPLE_HEAD if console.width < NARROW else box.HEAVY_HEAD)
    for i in keep:
        table.add_column(BUDGET_COLUMNS[i], justify="right" if 3 <= i <= 6 else "left", overflow="fold")
    for row in budget_rows(rep):
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    for line in choice_lines(rep["budget"]):  # layers per kind; how states and state corrections fared
        console.print(line, highlight=False, soft_wrap=True)
