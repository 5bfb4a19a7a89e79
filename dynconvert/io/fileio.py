"""Atomic output: every file dynconvert writes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import DynError


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output without ``force`` and a folder that cannot be written, before work starts."""
    path = Path(path)
    if path.is_dir():
        raise DynError(f"{path} is a directory; give a file path for the output")
    not_regular(path)
    if path.exists() and not force:
        raise DynError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DynError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DynError(f"cannot write {path}: folder {parent} is not writable")
    return path


def not_regular(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a device such as /dev/null, a
    FIFO, a socket): the rename that writes the output would replace it, --force or not."""
    if path.exists() and not path.is_file():
        raise DynError(f"{path} exists and is not a regular file (a device, pipe or socket); dynconvert only "
                       "replaces regular files: give another output path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any failure (an exception, KeyboardInterrupt, a full disk) the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=parent)
    except OSError as e:
        raise DynError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        move_into_place([(tmp_path, path)])
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise DynError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def private_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``, removed with everything in it on exit.

    For an output of several files (an ONNX graph and its external data), and for tools that
    write files of their own beside their output: built there, on the output's filesystem, each
    file reaches its final path in one rename (``move_into_place``); on any failure nothing is left.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=parent))
    except OSError as e:
        raise DynError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
    except OSError as e:
        raise DynError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(moves: list[tuple[Path, Path]]) -> None:
    """Rename each written temporary file onto its final path, in order, after an fsync of each:
    the last one is the file that makes the others visible (a graph after the data it points to).
    On failure the files already moved are removed, so no partial set is left."""
    umask = os.umask(0)
    os.umask(umask)
    for tmp, _ in moves:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and onnx's external data writer) create files 0600; outputs get the usual
        # permissions (0666 minus the umask)
        os.chmod(tmp, 0o666 & ~umask)
    for _, final in moves:
        not_regular(final)  # checked again as late as possible: it may have appeared meanwhile
    done: list[Path] = []
    try:
        for tmp, final in moves:
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for final in done:
            final.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sniff(path: str | os.PathLike) -> str | None:
    """What a file holds, from its first bytes: 'zip' (what torch.save writes), 'pickle' (legacy
    torch.save), 'dyn', 'safetensors', 'onnx', 'text', or None when it is none of these."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 10 and head[8:9] == b"{":  # before the pickle test: a header length may start with 0x80
        (n,) = struct.unpack("<Q", head[:8])
        with open(path, "rb") as f:
            f.seek(8)
            raw = f.read(min(n, 1 << 26))
        return "dyn" if b'"format\\":\\"dynconvert\\"' in raw else "safetensors"  # possibly truncated
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode + version
        return "pickle"
    # an ONNX ModelProto opens with field 1 (ir_version, a small varint) then producer_name or graph
    if path.suffix.lower() == ".onnx" or (len(head) >= 3 and head[0] == 8 and 1 <= head[1] < 32 and head[2:3] in (b"\x12", b"\x3a", b"\x42")):
        return "onnx"
    try:
        text = (head[:-4] if len(head) == 1 << 16 else head).decode("utf-8")  # a full read may split a character
    except UnicodeDecodeError:
        return None
    return "text" if text and all(c.isprintable() or c in "\t\r\n\f" for c in text) else None


KIND_NAMES = {
    "zip": "a PyTorch checkpoint", "pickle": "a PyTorch checkpoint (legacy pickle format)", "dyn": "a .dyn file",
    "safetensors": "a safetensors file", "onnx": "an ONNX model", "text": "a text file",
}


def expect_dyn(path: str | os.PathLike) -> None:
    """Refuse, with what the file really is, anything but a .dyn given where a .dyn is expected."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return  # the reader says what is wrong with it
    kind = sniff(path)
    if kind in ("zip", "pickle", "onnx", "text"):  # the others: the .dyn reader says what is wrong
        hint = f"; convert it first: dynconvert convert {path} --out model.dyn" if kind in ("zip", "pickle") else ""
        raise DynError(f"{path} is {KIND_NAMES[kind]}, not a .dyn{hint}")
