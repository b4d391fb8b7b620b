"""Experiments as configs (mtl_jax.runner.configs): resolution order, typed overrides, errors, the CLI."""
import dataclasses

import pytest

from mtl_jax import cli
from mtl_jax.runner import configs


@dataclasses.dataclass(frozen=True)
class Toy:
    out: str = configs.field("runs/toy", "output folder")
    lam1: float = configs.field(0.1, "ridge")
    seeds: int = configs.field(5, "seeds")
    rounds: int | None = configs.field(None, "rounds (none: automatic)")
    quick: bool = configs.field(False, "small")


PRESETS = {"full": {"seeds": 10}, "quick": {"quick": True, "seeds": 1}}


def test_defaults_then_preset_then_values():
    assert configs.make_config(Toy) == Toy()
    assert configs.make_config(Toy, "full", PRESETS).seeds == 10
    cfg = configs.make_config(Toy, "quick", PRESETS, seeds=3, lam1=1)
    assert (cfg.quick, cfg.seeds, cfg.lam1) == (True, 3, 1.0) and isinstance(cfg.lam1, float)


def test_overrides_are_typed_by_the_fields():
    got = configs.parse_overrides(Toy, ["lam1=1e-3", "seeds=1e1", "rounds=none", "quick=yes", "out=a=b"])
    assert got == {"lam1": 1e-3, "seeds": 10, "rounds": None, "quick": True, "out": "a=b"}
    assert configs.parse_overrides(Toy, ["rounds=7"]) == {"rounds": 7}


@pytest.mark.parametrize("items, match", [
    (["lam=1"], "lam: unknown key"), (["seeds=two"], "seeds: cannot read"), (["seeds"], "key=value"),
    (["quick=maybe"], "quick: cannot read"), (["seeds=1.5"], "seeds: cannot read"),
])
def test_bad_overrides_name_the_key(items, match):
    with pytest.raises(ValueError, match=match):
        configs.parse_overrides(Toy, items)


def test_bad_preset_or_value_type():
    with pytest.raises(ValueError, match="preset: unknown 'paper'"):
        configs.make_config(Toy, "paper", PRESETS)
    with pytest.raises(ValueError, match="seeds: expected int"):
        configs.make_config(Toy, seeds=True)
    with pytest.raises(ValueError, match="experiment: unknown name"):
        configs.load("nope")


def test_every_experiment_has_a_config_presets_and_a_description():
    for name, description in configs.describe():
        module = configs.load(name)
        assert description and dataclasses.is_dataclass(module.Config) and callable(module.run)
        assert {"full", "quick"} <= set(module.PRESETS)
        for preset in module.PRESETS:   # every preset resolves to a valid config
            configs.make_config(module.Config, preset, module.PRESETS)
        assert all(f.metadata.get("help") for f in dataclasses.fields(module.Config))


def test_cli_list_and_run_help(capsys):
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in configs.EXPERIMENTS)
    assert cli.main(["run", "dmtrl_accuracy", "--help"]) == 0
    text = capsys.readouterr().out
    assert "max_rounds" in text and "preset quick" in text
    assert cli.main(["run", "dmtrl_accuracy", "seeds=x"]) == 2
    assert "seeds: cannot read" in capsys.readouterr().err
