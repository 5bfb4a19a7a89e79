"""`python -m dynconvert` and the `dynconvert` script: the CLI, with an early Ctrl-C handled.

The package itself imports nothing heavy (see __init__), so a Ctrl-C while the CLI's modules (and
torch) are still loading lands here and ends quietly with 130 instead of a traceback.
"""

import sys


# The demo's figures (a training run) depend on which vector instructions torch's kernels, MKL and
# oneDNN pick: on AVX-512 and AVX2 machines they differed by up to 2.7 points. Pinned to the AVX2
# paths, which every x86-64 machine of the last decade has, the same seed gives the same figures.
# Read when those libraries first run, so set before torch is imported; a value already set wins.
DEMO_CPU_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run() -> None:
    if sys.argv[1:2] == ["demo"]:
        import os

        for key, value in DEMO_CPU_PATHS.items():
            os.environ.setdefault(key, value)
    try:
        from .io.allocator import keep_freed_memory

        keep_freed_memory()  # before torch allocates anything: half the CPU time otherwise (io/allocator.py)
        from .cli import main
    except KeyboardInterrupt:  # still starting up: nothing was begun, so nothing to clean
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
