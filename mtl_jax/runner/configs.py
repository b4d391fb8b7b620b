"""Experiments as typed configs: one dataclass per experiment, presets, ``key=value`` overrides (docs/experiments.md).

Every experiment of :mod:`mtl_jax.experiments` is a module with

* ``Config``: a frozen dataclass; each field has a default (the defaults finish in about a minute on a 2-core
  CPU) and a ``help`` in its metadata;
* ``PRESETS``: named sets of overrides, ``"full"`` (the paper-scale run) and ``"quick"`` (seconds, for CI);
* ``DESCRIPTION``: one line for ``mtl-jax list``;
* ``run(config)``: the experiment; it writes everything under ``config.out`` through the results store.

The same config drives the three ways of starting an experiment::

    mtl-jax run dmtrl_convergence --out runs/conv lam1=0.05 --preset full
    python experiments/dmtrl_convergence.py --out runs/conv --lam1 0.05 --preset full
    mtl_jax.experiments.dmtrl_convergence.run(make_config(Config, preset="full", out="runs/conv", lam1=0.05))

A config is resolved in one order: field defaults, then the preset, then the explicit values. An unknown key,
an unknown preset or a value that does not parse as the field's type is a ``ValueError`` that names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import typing
from typing import Any, Sequence

__all__ = ["field", "prepare", "EXPERIMENTS", "load", "describe", "make_config", "parse_overrides", "config_help", "script_main",
           "to_dict"]

def field(default, help: str):
    """A config field with its default and its one-line help (shown by ``--help`` and ``mtl-jax run NAME --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


#: The experiments ``mtl-jax run`` knows, by name (the module ``mtl_jax.experiments.<name>``).
EXPERIMENTS = ("school_convergence", "dmtrl_convergence", "dmtrl_accuracy", "task_weighting")


def load(name: str):
    """The experiment module ``mtl_jax.experiments.<name>``; ValueError naming ``name`` if there is none."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown name {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"mtl_jax.experiments.{name}")


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every experiment, for ``mtl-jax list``."""
    return [(name, load(name).DESCRIPTION) for name in EXPERIMENTS]


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _base_type(tp):
    """``int | None`` -> (int, True); ``float`` -> (float, False)."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _convert(key: str, value: Any, tp) -> Any:
    base, optional = _base_type(tp)
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", ""):
            return None
        try:
            if base is bool:
                return _parse_bool(text)
            if base is int:
                return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
            if base is float:
                return float(text)
            return text
        except ValueError:
            raise ValueError(f"{key}: cannot read {value!r} as {base.__name__}") from None
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float, str, bool) and not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {base.__name__}, got {value!r}")
    return value


def make_config(cls, preset: str | None = None, presets: dict | None = None, **values):
    """``cls`` from its defaults, then ``presets[preset]``, then ``values`` (each converted to the field's type).

    Raises ValueError naming an unknown preset, an unknown key, or a value of the wrong type.
    """
    types = _field_types(cls)
    merged: dict[str, Any] = {}
    if preset is not None:
        presets = presets or {}
        if preset not in presets:
            raise ValueError(f"preset: unknown {preset!r}; known: {', '.join(presets) or 'none'}")
        merged.update(presets[preset])
    merged.update(values)
    unknown = sorted(set(merged) - set(types))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key of {cls.__name__}; keys: {', '.join(types)}")
    return cls(**{k: _convert(k, v, types[k]) for k, v in merged.items()})


def parse_overrides(cls, items: Sequence[str]) -> dict[str, Any]:
    """``["lam1=0.1", "seeds=3"]`` -> ``{"lam1": 0.1, "seeds": 3}`` typed by ``cls``'s fields (dashes allowed)."""
    types = _field_types(cls)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"override: expected key=value, got {item!r}")
        if key not in types:
            raise ValueError(f"{key}: unknown key of {cls.__name__}; keys: {', '.join(types)}")
        out[key] = _convert(key, value, types[key])
    return out


def prepare(config) -> None:
    """What every experiment's ``run`` does first: float64 (its certificates are compared with references) and
    the persistent compilation cache, unless the config's ``compile_cache`` is off."""
    import jax

    jax.config.update("jax_enable_x64", True)
    if getattr(config, "compile_cache", True):
        from mtl_jax.compilation import enable_compilation_cache
        enable_compilation_cache()


def to_dict(config) -> dict[str, Any]:
    """The config as a JSON-ready dict (for manifests)."""
    return dataclasses.asdict(config)


def config_help(cls, presets: dict | None = None) -> str:
    """A table of the keys, their types, defaults and help, then the presets (``mtl-jax run NAME --help``)."""
    types = _field_types(cls)
    lines = ["keys (key=value; defaults finish in about a minute on 2 CPU cores):"]
    for f in dataclasses.fields(cls):
        base, optional = _base_type(types[f.name])
        kind = base.__name__ + (" or none" if optional else "")
        lines.append(f"  {f.name:<22} {kind:<14} default {f.default!r:<24} {f.metadata.get('help', '')}")
    for name, values in (presets or {}).items():
        lines.append(f"preset {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    return "\n".join(lines)


def script_main(module, argv: Sequence[str] | None = None):
    """The command line of ``python experiments/<name>.py``: one ``--key value`` flag per config field
    (booleans: ``--key`` / ``--no-key``), ``--preset NAME`` and ``--quick`` (= ``--preset quick``)."""
    cls, presets = module.Config, getattr(module, "PRESETS", {})
    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(types[f.name])
        helptext = f"{f.metadata.get('help', '')} (default {f.default!r})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=helptext)
    parser.add_argument("--preset", choices=sorted(presets), default=None, help="named set of values")
    parser.add_argument("--quick", action="store_true", help="the quick preset (seconds; CI)")
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    try:
        config = make_config(cls, preset, presets, **values)
    except ValueError as err:
        parser.error(str(err))
    return module.run(config)
