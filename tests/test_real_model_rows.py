"""benchmarks.real_rows.measured_once: budgets of one run share a measured candidate table only
when they measure the same candidates."""

import types

from benchmarks.real_rows import measured_once
from dynconvert.budget import pipeline


def test_a_table_is_reused_only_at_the_same_share(monkeypatch):
    calls = []

    def measure(model, units, *args, notes=None, share=0.0, **kwargs):
        calls.append(share)
        notes["seen"] = share
        return ({"layer": [share]}, {"layer": 1.0})

    monkeypatch.setattr(pipeline, "measure_candidates", measure)
    bench = types.SimpleNamespace(cache={})
    units = [types.SimpleNamespace(name="layer")]
    results = []
    for share in (1 / 8, 1 / 8, 1 / 16):   # --size 1/4 twice, then --size 1/8
        with measured_once(bench):
            notes = {}
            results.append((pipeline.measure_candidates(None, units, notes=notes, share=share), notes))
    assert calls == [1 / 8, 1 / 16]
    assert results[1] == results[0] and results[2][0][0] == {"layer": [1 / 16]} and results[2][1] == {"seen": 1 / 16}
    assert pipeline.measure_candidates is measure   # put back after each run
