"""``python -m mtl_jax``: the command line (see :mod:`mtl_jax.cli`)."""
import sys

from mtl_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
