import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while still starting up: nothing was begun, so nothing to clean
    sys.exit(130)

main()
