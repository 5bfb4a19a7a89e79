"""Interrupting a real `python -m dynconvert` process at several points never leaves a partial output.

Points: during start-up, after the first and third finished layer, while a finished layer's fit is
being saved, and half-way through writing the final file (a wrapper slows that write down so the
signal lands inside it). SIGINT and SIGTERM each; with and without an earlier output to overwrite.
Then a SIGKILL followed by `--resume`, which must reuse the layers finished before the kill.

`interrupt()` is written for any command that writes one output file: point it at `finetune` and
`export` with their arguments once those commands exist.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from _tiny import FACTORY, tiny_checkpoint, use_factory

from dynconvert.io.safetensors_io import read_safetensors

pytestmark = pytest.mark.slow  # real processes and signals: seconds each (CI runs this tier)

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 5  # 6 converted layers: enough for "after the third" to land mid-run
STEPS = "20"

SLOW_WRITE = textwrap.dedent(
    """
    # Slows down the final write so a test can interrupt it half-way: writes half the bytes, says so
    # on stderr, waits, then writes the rest.
    import pathlib, sys, time
    _real = pathlib.Path.write_bytes
    def _slow(self, data):
        if self.name.endswith(".part"):
            tag = "SAVING-FIT" if self.parent.name.endswith(".partial") else "WRITING-OUTPUT"
            if tag != __import__("os").environ.get("SLOW_WRITE"):
                return _real(self, data)
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                print(tag, file=sys.stderr, flush=True)
                time.sleep(float(__import__("os").environ.get("SLOW_WRITE_S", "0")))
                f.write(data[len(data) // 2 :])
            return len(data)
        return _real(self, data)
    pathlib.Path.write_bytes = _slow
    """
)


@pytest.fixture
def workdir(tmp_path):
    tiny_checkpoint(tmp_path, layers=LAYERS)
    (tmp_path / "_slow_write.py").write_text(SLOW_WRITE)
    return tmp_path


def start(workdir, args, slow=""):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{workdir}", SLOW_WRITE=slow, SLOW_WRITE_S="60", COLUMNS="200")
    code = ["-c", "import _slow_write; from dynconvert.cli import main; main()"] if slow else ["-m", "dynconvert"]
    return subprocess.Popen([sys.executable, *code, *map(str, args)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, predicate, timeout=120):
    """Read stderr lines until ``predicate(lines)`` holds; returns the lines read so far."""
    lines, timer = [], threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        while not predicate(lines):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        timer.cancel()
    return lines


def layer_lines(lines):
    return [line for line in lines if "ratio" in line and "svd" in line]


def interrupt(workdir, args, out, point, sig, previous=None):
    """Run ``args``, send ``sig`` at ``point``, and check the output is untouched or absent."""
    if previous is not None:
        out.write_bytes(previous)
        args = [*args, "--force"]
    tag = {"saving-fit": "SAVING-FIT", "writing-output": "WRITING-OUTPUT"}.get(point, "")
    proc = start(workdir, args, slow=tag)
    if point == "startup":  # while Python and the CLI are still importing
        time.sleep(0.7)
        seen = []
    elif point.startswith("after-"):
        k = int(point.split("-")[1])
        seen = wait_for(proc, lambda lines: len(layer_lines(lines)) >= k)
    else:
        seen = wait_for(proc, lambda lines: tag in lines)
        assert tag in seen, f"never reached {point}: {seen}"
    assert proc.poll() is None, f"finished before the {point} signal: {seen}"
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    stderr = "\n".join(seen) + "\n" + rest
    assert proc.returncode != 0
    if point != "startup":  # while Python is still importing torch, Ctrl-C is Python's own (see README)
        assert "Traceback" not in stderr, stderr
    if previous is None:
        assert not out.exists(), "a partial output was left"
    else:
        assert out.read_bytes() == previous, "the previous output was changed"
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left"
    return proc.returncode, stderr


CASES = [  # (point, signal, overwrite an earlier output?)
    ("startup", signal.SIGINT, False),
    ("startup", signal.SIGTERM, True),
    ("after-1", signal.SIGINT, True),
    ("after-3", signal.SIGTERM, False),
    ("saving-fit", signal.SIGINT, False),
    ("writing-output", signal.SIGTERM, True),
    ("writing-output", signal.SIGINT, False),
]


@pytest.mark.parametrize("point,sig,overwrite", CASES, ids=[f"{p}-{s.name}-{'overwrite' if o else 'fresh'}" for p, s, o in CASES])
def test_interrupt_convert(workdir, point, sig, overwrite):
    out = workdir / "out.dyn"
    previous = b"an earlier conversion" if overwrite else None
    args = ["convert", workdir / "tiny.pth", "--out", out, "--model", FACTORY, "--steps", STEPS, "--min-params", "100",
            "--input-size", "1,8,8"]
    code, stderr = interrupt(workdir, args, out, point, sig, previous)
    if point != "startup":  # once the CLI runs, the exit is the documented one with a message
        assert code == 130 and "interrupted" in stderr, stderr
    partial = workdir / "out.dyn.partial"
    if partial.exists():  # finished layers kept for --resume: whole files only
        assert "--resume" in stderr
        for f in partial.iterdir():
            assert f.suffix == ".safetensors", f"stray file {f.name}"
            read_safetensors(f)


def test_kill_then_resume_skips_finished_layers(workdir, cli, monkeypatch):
    out = workdir / "out.dyn"
    args = ["convert", workdir / "tiny.pth", "--out", out, "--model", FACTORY, "--steps", STEPS, "--min-params", "100",
            "--input-size", "1,8,8"]
    proc = start(workdir, args)
    seen = layer_lines(wait_for(proc, lambda lines: len(layer_lines(lines)) >= 2))
    assert len(seen) == 2 and proc.poll() is None
    proc.kill()  # SIGKILL: no handler runs, only what was already on disk survives
    proc.wait()
    assert not out.exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "dynconvert", *map(str, args), "--resume"], cwd=workdir, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{workdir}", COLUMNS="200"), timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    n = int(resumed.stderr.split("resumed ")[1].split()[0])
    assert 2 <= n <= 3, resumed.stderr  # at most the layer in progress at the kill is redone
    assert not (workdir / "out.dyn.partial").exists(), "the partial folder outlived the final write"

    # the resumed file is the very file an uninterrupted run writes
    use_factory(monkeypatch, workdir)
    code, _, stderr = cli(*args[:3], workdir / "fresh.dyn", *args[4:])
    assert code == 0, stderr
    # the same fits, tensors and metadata; the network probe's figure aside: the in-process run's
    # probe is the tests' quick one (conftest.quick_probe), the subprocess ran the real one
    from dynconvert.dynfile.format import read_dyn

    (mine, meta), (fresh, fresh_meta) = read_dyn(out)[:2], read_dyn(workdir / "fresh.dyn")[:2]
    assert mine.keys() == fresh.keys() and all(torch.equal(mine[k], fresh[k]) for k in mine)
    assert {k: v for k, v in meta.items() if k != "network"} == {k: v for k, v in fresh_meta.items() if k != "network"}


def test_resume_refuses_other_options(workdir, cli, monkeypatch):
    """Fits saved under other options (or another checkpoint) are never mixed into a conversion."""
    ckpt = tiny_checkpoint(workdir, layers=3)
    use_factory(monkeypatch, workdir)
    out = workdir / "o.dyn"
    base = ["convert", ckpt, "--out", out, "--model", FACTORY, "--min-params", "100", "--input-size", "1,8,8"]
    import dynconvert.dynfile.resume as rs

    real = rs.Checkpointing.layer_done
    calls = []

    def stop_after_one(self, *a):
        real(self, *a)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(rs.Checkpointing, "layer_done", stop_after_one)
    code, _, stderr = cli(*base, "--steps", "3")
    assert code == 130 and "--resume" in stderr and len(calls) == 1
    monkeypatch.setattr(rs.Checkpointing, "layer_done", real)

    code, _, stderr = cli(*base, "--steps", "4", "--resume")
    assert code != 0 and "other options" in stderr and not out.exists()
    code, _, stderr = cli(*base, "--steps", "3")
    assert code != 0 and "--resume" in stderr  # never silently discarded
    code, _, stderr = cli(*base, "--steps", "3", "--resume")
    assert code == 0 and "resumed 1 finished layers" in stderr, stderr
