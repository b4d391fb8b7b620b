"""``python -m mtl_jax``: the command line (see :mod:`mtl_jax.cli`)."""
from mtl_jax.cli import main
from mtl_jax.launch import exit_worker

if __name__ == "__main__":
    exit_worker(main())  # sys.exit, except that a failing worker of a multi-process run ends at once
