"""Every key of a method's config dataclass (the keys under ``method:``) is documented, in
backticks, on that method's page under docs/methods/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from asa3d.methods import load_builtin_methods
from asa3d.methods.base import METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods"
PAGES = {
    "asa": "asa.md",
    "simmim": "simmim.md",
    "swinssl": "swinssl.md",
    "voco": "voco.md",
    "adam": "adam.md",
}


def test_every_builtin_method_has_a_page() -> None:
    load_builtin_methods()  # tests may register methods of their own: only asa3d's count here
    assert {n for n, cls in METHODS.items() if cls.__module__.startswith("asa3d.methods.")} == set(PAGES)


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_config_key_is_on_the_method_page(name: str) -> None:
    load_builtin_methods()
    text = (DOCS / PAGES[name]).read_text()
    keys = [f.name for f in dataclasses.fields(METHODS[name].Config)]
    missing = [k for k in keys if f"`{k}`" not in text and f"`{k}:" not in text and f"`{k} " not in text]
    assert not missing, f"docs/methods/{PAGES[name]} does not document method keys {missing}"
