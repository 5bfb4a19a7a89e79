"""Thread discipline (workers.py): the same bytes on any thread count, workers that behave."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _tiny import FACTORY, tiny_checkpoint, use_factory

from dynconvert.dynamics import workers
from dynconvert.dynamics.conversion import ConvertCallbacks, ConvertOptions, convert_model

ROOT = Path(__file__).resolve().parent.parent


def test_same_bytes_on_one_and_two_threads(tmp_path, cli, small_factory):
    """Weight-only and calibrated conversions: --threads 1 (here, one thread) and --threads 2
    (two worker processes) write the very same file, while torch itself runs on 2 threads."""
    ckpt, factory = small_factory
    common = ["--model", factory, "--steps", "30", "--min-params", "100", "--seed", "5", "--input-size", "3,8,8"]
    for calib in ([], ["--calib", "fake", "--calib-images", "16", "--calib-steps", "10"]):
        outs = []
        for threads in ("1", "2"):
            torch.set_num_threads(2)
            outs.append(tmp_path / f"t{threads}{'c' if calib else ''}.dyn")
            code, _, err = cli("convert", ckpt, "--out", outs[-1], *common, *calib, "--threads", threads)
            assert code == 0, err
        assert outs[0].read_bytes() == outs[1].read_bytes(), f"calib={calib}"
    assert torch.get_num_threads() == 2  # the CLI restores torch's thread count


def test_callbacks_in_layer_order_with_workers():
    """With workers, layer_start/layer_done still come once per layer, in plan order."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(48, 48) for _ in range(4)])
    events = []

    class Record(ConvertCallbacks):
        def layer_start(self, index, total, item):
            events.append(("start", index, item.name))

        def layer_done(self, index, total, stats, fit):
            events.append(("done", index, stats.name))

    _, stats, _ = convert_model(model, ConvertOptions(steps=5, min_params=100), Record(), threads=2)
    names = [s.name for s in stats]
    assert names == ["0", "1", "2", "3"]
    assert events == [(kind, i, n) for i, n in enumerate(names) for kind in ("start", "done")]


def test_worker_error_is_one_line(tmp_path, cli, monkeypatch):
    """A fit that fails in a worker process ends the CLI with the worker's own error line."""
    ckpt = tiny_checkpoint(tmp_path, layers=2)
    use_factory(monkeypatch, tmp_path)  # not a same-named factory an earlier test imported
    code, _, err = cli("convert", ckpt, "--out", tmp_path / "o.dyn", "--model", FACTORY, "--steps", "5",
                       "--min-params", "100", "--lr", "1e38", "--threads", "2", "--input-size", "1,8,8")
    assert code == 2 and "the fit diverged" in err and "Traceback" not in err, err
    assert not (tmp_path / "o.dyn").exists()


def test_threads_option_checked(tmp_path, cli, small_factory):
    ckpt, factory = small_factory
    code, _, err = cli("convert", ckpt, "--out", tmp_path / "o.dyn", "--model", factory, "--threads", "0")
    assert code == 2 and "--threads must be >= 1" in err, err


def test_default_respects_affinity_and_omp(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert workers.available_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert workers.available_cores() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert workers.available_cores() == 3
    with workers.using_threads(None) as n:
        assert n == 3 and workers.threads() == 3 and torch.get_num_threads() == 3
    assert workers.threads() == 1  # outside the block: no workers


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers are children of the fork server, not of the CLI)."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    parent = {int(a): int(b) for a, b in (r.split() for r in rows if r.strip())}
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return found


def _gone(pids, timeout=20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_the_conversion(tmp_path, sig):
    """Ctrl-C stops the workers with the parent (exit 130, no output); a SIGKILLed parent's
    workers notice and exit on their own."""
    tiny_checkpoint(tmp_path, layers=4)
    out = tmp_path / "o.dyn"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynconvert", "convert", "tiny.pth", "--out", out, "--model", FACTORY,
         "--steps", "4000", "--min-params", "100", "--threads", "2", "--input-size", "1,8,8"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        kids: set[int] = set()
        end = time.time() + 120
        while len(kids) < 4 and time.time() < end and proc.poll() is None:  # 2 workers, fork server, tracker
            time.sleep(0.3)
            kids = _descendants(proc.pid)
        assert len(kids) >= 4, f"the worker processes did not start: {kids}"
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert _gone(kids), "a worker process outlived its conversion"
    assert not out.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
