"""Config values are read as a user writes them, on the command line and in YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from asa3d.config import ConfigError, load_config, parse_override
from asa3d.config_sections import PretrainConfig


@pytest.mark.parametrize(
    ("text", "want"),
    [("3e-3", 3e-3), ("1E5", 1e5), ("-2.5e-4", -2.5e-4), ("3.0e-3", 3e-3), (".5e1", 5.0), ("1_0e1", 100.0)],
)
def test_exponent_floats_without_a_dot_are_floats(text: str, want: float) -> None:
    """YAML 1.1 (PyYAML) reads ``3e-3`` as a string; configs read it as the float a user meant."""
    _, value = parse_override(f"train.lr={text}")
    assert isinstance(value, float) and value == pytest.approx(want)


@pytest.mark.parametrize(
    ("text", "want"), [("3", 3), ("e5", "e5"), ("1e", "1e"), ("true", True), ("abc", "abc")]
)
def test_other_scalars_are_unchanged(text: str, want: object) -> None:
    _, value = parse_override(f"a.b={text}")
    assert value == want and type(value) is type(want)


def test_lr_in_exponent_form_from_the_command_line_and_a_file(tmp_path: Path) -> None:
    assert load_config(PretrainConfig, None, ["train.lr=3e-3"]).train.lr == pytest.approx(3e-3)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 2e-4\n")
    assert load_config(PretrainConfig, f).train.lr == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="lr"):  # a real string is still refused
        load_config(PretrainConfig, None, ["train.lr=fast"])
