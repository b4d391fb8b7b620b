"""Compile once per machine: JAX's persistent compilation cache.

A new Python process normally compiles every program again (about a second for a solver). With the
persistent cache on, XLA executables are written to a folder and later processes load them instead of
compiling; tracing and lowering still happen, compiling does not.

    import mtl_jax
    mtl_jax.enable_compilation_cache()          # ~/.cache/mtl_jax/jax (or $XDG_CACHE_HOME/mtl_jax/jax)

The command line (``mtl-jax``) and the experiment scripts call it by default; ``--no-compile-cache``
turns it off, and so does the environment variable ``MTL_JAX_NO_COMPILE_CACHE=1``.
"""
from __future__ import annotations

import os

import jax

ENV_DISABLE = "MTL_JAX_NO_COMPILE_CACHE"
ENV_DIR = "MTL_JAX_CACHE_DIR"


def default_cache_dir() -> str:
    """``$MTL_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtl_jax/jax``, else ``~/.cache/mtl_jax/jax``."""
    if os.environ.get(ENV_DIR):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_DIR]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtl_jax", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`default_cache_dir`).

    Every program is cached, however quick to compile (JAX's default skips those under a second,
    which are most of ours). Safe to call more than once; the last folder wins. Returns the folder,
    or None when ``MTL_JAX_NO_COMPILE_CACHE`` is set (then nothing changes).

    Raises:
      ValueError: ``path`` exists and is not a folder, or cannot be created.
    """
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return None
    folder = os.path.abspath(os.path.expanduser(os.fspath(path))) if path is not None else default_cache_dir()
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"path: {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"path: cannot create the cache folder {folder} ({e.strerror or e})") from None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset_cache_state()
    return folder


def cache_dir() -> str | None:
    """The folder of the persistent compilation cache now in use, or None when it is off."""
    return jax.config.jax_compilation_cache_dir or None


def disable_compilation_cache() -> None:
    """Turn the persistent cache off for the rest of this process."""
    jax.config.update("jax_compilation_cache_dir", None)
    _reset_cache_state()


def _reset_cache_state():
    # JAX initialises its cache object once, on the first compile; a folder set afterwards is only
    # picked up after a reset (private API, so tolerate its absence in other JAX versions).
    try:
        from jax._src import compilation_cache as cc

        cc.reset_cache()
    except Exception:  # pragma: no cover - depends on the JAX version
        pass
