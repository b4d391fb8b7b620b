"""The package as a user installs it: a wheel built from this checkout, installed into a folder of its own,
run from outside the checkout (``python -m mtl_jax`` and the ``mtl-jax`` console script).

The dependencies (JAX, NumPy, ...) come from the running environment; ``PYTHONPATH`` holds only the
install folder, so ``mtl_jax`` itself must come from the wheel, not from the checkout.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import mtl_jax
from mtl_jax.runner import store

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "mtl_jax")   # what the build reads (pyproject names README.md)

def _can_build_offline() -> bool:
    """Whether this environment's setuptools can build the wheel itself (pyproject asks for >= 68; wheels need
    ``bdist_wheel``, built in from 70.1, else the ``wheel`` package). Otherwise pip fetches the build backend."""
    try:
        version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (68, 0) and importlib.util.find_spec("wheel") is not None)


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, site folder, working folder outside the checkout) for a wheel of this checkout."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"   # a copy, so that the build leaves no build/ or *.egg-info in the checkout
    source.mkdir()
    for name in SOURCES:
        src = os.path.join(REPO_ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, source / name)
    offline = ["--no-build-isolation"] if _can_build_offline() else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", str(root / "dist"), str(source)])
    wheels = sorted((root / "dist").glob("mtl_jax-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheels[0])])
    work = root / "work"
    work.mkdir()
    return wheels[0], site, work


def _env(site):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env["MTL_JAX_NO_COMPILE_CACHE"] = "1"      # no writes into ~/.cache
    return env


def test_wheel_holds_every_subpackage_and_the_console_script(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    checkout = {os.path.relpath(os.path.join(folder, f), REPO_ROOT).replace(os.sep, "/")
                for folder, _, files in os.walk(os.path.join(REPO_ROOT, "mtl_jax"))
                for f in files if f.endswith(".py")}
    assert checkout <= names, sorted(checkout - names)
    assert not any(n.startswith(("tests/", "experiments/", "benchmarks/")) for n in names)
    assert "mtl-jax = mtl_jax.cli:entry_point" in entry_points
    assert f"Version: {mtl_jax.__version__}" in metadata and "Requires-Dist: jax" in metadata


def test_installed_package_is_imported_from_the_install_folder(installed):
    _, site, work = installed
    done = _run([sys.executable, "-c", "import mtl_jax, mtl_jax.cli, mtl_jax.runner.store as s; "
                 "print(mtl_jax.__file__); print(mtl_jax.cli.__file__); print(s.__file__)"],
                env=_env(site), cwd=work)
    files = done.stdout.split()
    assert len(files) == 3
    for path in files:
        assert os.path.commonpath([os.path.realpath(path), os.path.realpath(site)]) == os.path.realpath(site), path


def test_python_m_mtl_jax_help_lists_the_commands(installed):
    _, site, work = installed
    done = _run([sys.executable, "-m", "mtl_jax", "--help"], env=_env(site), cwd=work)
    for command in ("fit", "data", "plot"):
        assert command in done.stdout
    assert done.stdout.startswith("usage: mtl-jax")


def test_console_script_help_lists_the_commands(installed):
    _, site, work = installed
    script = site / "bin" / "mtl-jax"
    assert script.is_file() and os.access(script, os.X_OK)
    done = _run([str(script), "--help"], env=_env(site), cwd=work)
    for command in ("fit", "data", "plot"):
        assert command in done.stdout
    version = _run([str(script), "--version"], env=_env(site), cwd=work)
    assert version.stdout.strip() == f"mtl_jax {mtl_jax.__version__}"


def test_console_script_makes_data_and_fits_it_like_the_library(installed):
    _, site, work = installed
    script, env = str(site / "bin" / "mtl-jax"), _env(site)
    _run([script, "data", "synthetic", "--tasks", "4", "--dim", "3", "--samples", "10", "--seed", "2",
          "--out", "synth.npz"], env=env, cwd=work)
    _run([script, "fit", "--data", "synth.npz", "--lam1", "0.1", "--lam2", "1", "--out", "run"],
         env=env, cwd=work)
    run = store.read_run(work / "run")
    assert run.summary["converged"] is True
    with np.load(work / "synth.npz", allow_pickle=False) as f:
        want = mtl_jax.fit(f["X"], f["y"], f["task"], lam1=0.1, lam2=1.0)
    np.testing.assert_allclose(run.arrays["W"], want.W, rtol=1e-10, atol=1e-12)
