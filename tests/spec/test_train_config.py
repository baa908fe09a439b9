"""The shared configuration style (dali_objcrop.train.config): typed --field=value flags, lists, optionals,
JSON files, unknown keys rejected, several dataclasses on one command line, --help."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from dali_objcrop.train.config import (ConfigError, HelpRequested, config_dict, parse_config, parse_configs,
                                       parse_or_exit)


@dataclass
class Run:
    """A run."""

    name: str = "a"                   # what to call it
    steps: int = 10
    lr: float = 0.1
    fast: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    pair: tuple[float, float] = (1.0, 2.0)
    limit: int | None = None


@dataclass
class Extra:
    """More settings."""

    out: str = ""
    tags: list[str] = field(default_factory=list)


def test_values_are_typed_from_the_dataclass():
    r = parse_config(Run, ["--name=b", "--steps", "7", "--lr=1e-3", "--fast", "--seeds", "1", "2", "3",
                           "--pair=0.5,4", "--limit=none"])
    assert r == Run(name="b", steps=7, lr=1e-3, fast=True, seeds=[1, 2, 3], pair=(0.5, 4.0), limit=None)
    assert isinstance(r.lr, float) and isinstance(r.pair[1], float)
    assert parse_config(Run, ["--seeds=4,5", "--fast=false", "--limit=3"]) == Run(seeds=[4, 5], limit=3)
    assert parse_config(Run, ["--seeds"]).seeds == []          # a bare list flag: empty
    assert parse_config(Run(steps=3), []).steps == 3            # an instance gives the defaults


@pytest.mark.parametrize("argv, msg", [
    (["--bogus=1"], "unknown flag --bogus"),
    (["--steps=abc"], "--steps expects int"),
    (["--steps=1.5"], "--steps expects int"),
    (["--fast=maybe"], "expects a boolean"),
    (["--pair=1,2,3"], "expects 2 values"),
    (["--name"], "needs a value"),
    (["positional"], "unexpected argument"),
])
def test_bad_flags_are_named(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(Run, argv)


def test_json_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 5, "seeds": [7, 8], "out": "x"}))
    r, e = parse_configs([Run, Extra], [f"--config={f}", "--steps=6", "--tags", "p", "q"])
    assert (r.steps, r.seeds, e.out, e.tags) == (6, [7, 8], "x", ["p", "q"])
    # what a run saves parses back to the same configuration
    f.write_text(json.dumps(config_dict(r)))
    assert parse_config(Run, [f"--config={f}"]) == r
    f.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        parse_config(Run, [f"--config={f}"])
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config(Run, [f"--config={f}"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config(Run, [f"--config={tmp_path / 'missing.json'}"])


def test_required_fields_and_the_main_helper(capsys):
    with pytest.raises(ConfigError, match="--limit required"):
        parse_configs([Run], ["--steps=2"], required=("limit",))
    assert parse_configs([Run], ["--limit=4"], required=("limit",))[0].limit == 4
    with pytest.raises(SystemExit) as e:         # a main's bad flag: the message, exit code 2, no traceback
        parse_or_exit([Run], ["--stepz=2"], "prog")
    assert e.value.code == 2 and "prog: error: unknown flag --stepz" in capsys.readouterr().err


def test_a_field_in_two_classes_is_refused():
    @dataclass
    class Clash:
        steps: int = 1
    with pytest.raises(ConfigError, match="'steps' is in both"):
        parse_configs([Run, Clash], [])


def test_help_lists_fields_with_defaults_and_comments(capsys):
    with pytest.raises(HelpRequested) as e:
        parse_configs([Run, Extra], ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--name=a  (str)  what to call it" in text and "--seeds=0  (list[int])" in text
    assert "Extra: More settings." in text
