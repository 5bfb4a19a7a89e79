"""What many tests share: the one-line error check and a subprocess runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(code: int, stdout: str, stderr: str, out: Path | None = None) -> str:
    """The CLI failed the user-facing way: non-zero exit, one ``error:`` line, no traceback, and no
    (half-)written ``out``. Returns the line."""
    assert code != 0, stdout
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), f"{out} was written"
    return lines[0]


def env(*paths, **extra) -> dict:
    """The environment of a child process: one thread, this checkout (and ``paths``) importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(map(str, [ROOT, *paths])), **extra)


def run(cmd, cwd, timeout: float = 300, paths=(), **extra) -> subprocess.CompletedProcess:
    """Run ``cmd`` (``python -m dynconvert ...`` when it starts with "dynconvert") in its own process
    group, killed whole on timeout (torchrun has children)."""
    cmd = [str(c) for c in cmd]
    if cmd[0] == "dynconvert":
        cmd = [sys.executable, "-m", "dynconvert", *cmd[1:]]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(*paths, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
