"""Every user-facing name is listed once (mtl_jax.names) and read by the checks, the CLI and the docs."""
import pathlib

import pytest

from mtl_jax import cli, losses, names, weighting
from mtl_jax.solvers import centralized

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _choices(*path):
    parser = cli.build_parser()
    for name in path:
        sub = next(a for a in parser._actions if getattr(a, "choices", None) and name in a.choices)
        parser = sub.choices[name]
    return parser


def _option_choices(parser, option):
    return tuple(next(a for a in parser._actions if option in a.option_strings).choices)


def test_implementations_register_exactly_the_listed_names():
    assert tuple(losses._REGISTRY) == names.LOSSES
    assert weighting.SCHEMES == names.SCHEMES
    for name in names.SCHEMES + names.EXTRA_SCHEMES:
        assert callable(weighting.get(name, **({"weights": (1.0, 1.0)} if name == "fixed" else {})).update)
    assert centralized.METHODS == names.METHODS


def test_cli_choices_are_the_listed_names():
    fit = _choices("fit")
    assert _option_choices(fit, "--loss") == names.LOSSES
    assert _option_choices(fit, "--method") == names.METHODS
    assert _option_choices(_choices("data", "synthetic"), "--loss") == names.LOSSES


@pytest.mark.parametrize("group", ["LOSSES", "METHODS", "SOLVERS", "SCHEMES", "EXTRA_SCHEMES"])
def test_docs_mention_every_listed_name(group):
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [n for n in getattr(names, group) if f"`{n}`" not in text]
    assert not missing, f"docs/ never mention {missing} of names.{group}"


def test_unknown_names_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="loss"):
        losses.get_loss("cubic")
    with pytest.raises(ValueError, match="name"):
        weighting.get("pcgrad")
