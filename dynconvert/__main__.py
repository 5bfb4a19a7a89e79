"""`python -m dynconvert` and the `dynconvert` script: the CLI, with an early Ctrl-C handled.

The package itself imports nothing heavy (see __init__), so a Ctrl-C while the CLI's modules (and
torch) are still loading lands here and ends quietly with 130 instead of a traceback.
"""

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:  # still starting up: nothing was begun, so nothing to clean
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
