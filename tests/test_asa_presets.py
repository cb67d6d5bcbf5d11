"""Every Table 2/3 preset YAML expands to exactly its phases and tasks (docs/methods/asa.md, "Configs")."""

from __future__ import annotations

import pytest

from asa3d.config import CONFIG_DIR, from_dict, read_yaml
from asa3d.config_sections import ModelConfig, PretrainConfig
from asa3d.methods.base import build_method

P1, P2, P3 = ("P1", "shuffle"), ("P2", "related_crops"), ("P3", "related_crops")
EXPECTED = {
    "S1": [(*P2, {"lc", "gc"})],
    "S2": [(*P2, {"gc"})],
    "S3": [(*P1, {"var"})],
    "S4": [(*P1, {"sop", "var"})],
    "S5": [(*P1, {"sop", "gc", "var"})],
    "S6": [(*P1, {"sop", "var"}), (*P2, {"gc"})],
    "S7": [(*P1, {"sop", "gc", "var"}), (*P2, {"gc"})],
    "S8": [(*P1, {"sop", "gc", "var"}), (*P2, {"gc"}), (*P3, {"lc"})],
    "S9": [(*P1, {"sop", "var"}), (*P2, {"gc"}), (*P3, {"lc"})],
    "S10": [(*P1, {"sop"}), (*P2, {"lc", "gc"})],
    "S10_text": [(*P1, {"sop", "var"}), (*P2, {"lc", "gc"})],
    "S11": [(*P1, {"sop", "gc", "var"}), (*P2, {"lc", "gc"})],
    "t2_order1d": [(*P1, {"sop", "var"})],
    "t2_order3d": [(*P1, {"sop", "var"})],
}
# Small enough to build every preset on a CPU; the phase/task structure is what is checked.
SHRINK = {"input_size": 64, "p2_max_offset_cells": 1, "global_proj_dim": 16, "local_proj_dim": 16}
TINY_MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1))


def test_every_preset_file_is_listed() -> None:
    files = {p.stem for p in (CONFIG_DIR / "pretrain" / "asa_ablations").glob("*.yaml")}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_expands(name: str) -> None:
    data = read_yaml(f"pretrain/asa_ablations/{name}.yaml")
    cfg = from_dict(PretrainConfig, data)
    assert cfg.model.feature_size == 48 and cfg.train.epochs == 400  # inherited from asa.yaml
    assert cfg.data.preset == "luna16"  # Tables 2 and 3 were pretrained on LUNA16 only, not AMOS
    method = build_method({**cfg.method, **SHRINK}, TINY_MODEL)
    got = [(p.name, p.view, set(p.tasks)) for p in method.cfg.phases]
    assert got == EXPECTED[name]
    assert method.phases() == [p[0] for p in EXPECTED[name]]
    tasks = set().union(*(p[2] for p in EXPECTED[name]))
    assert hasattr(method.student, "order_head") == ("sop" in tasks)
    assert hasattr(method.student, "local_proj") == ("lc" in tasks)
    assert method.transfer_parts()["decoder"] == ("var" in tasks)
    assert method.cfg.order_target == ("1d" if name == "t2_order1d" else "3d")
    if name == "t2_order1d":
        assert method.student.order_head[-1].out_features == 1


@pytest.mark.parametrize("path", ["pretrain/asa.yaml", "pretrain/asa_tiny.yaml"])
def test_main_configs_validate(path: str) -> None:
    cfg = from_dict(PretrainConfig, read_yaml(path))
    from asa3d.methods.asa import ASAConfig

    section = {k: v for k, v in cfg.method.items() if k != "name"}
    acfg = from_dict(ASAConfig, section, where="method")
    if path.endswith("asa.yaml"):
        assert (acfg.input_size, acfg.p2_size, acfg.global_proj_dim) == (128, 160, 8192)
        assert cfg.model.feature_size == 48 and cfg.train.batch_size == 12 and cfg.train.lr == 1e-3
        assert cfg.data.preprocess.spacing == (1.5, 1.5, 2.0) and cfg.data.preprocess.window == (
            -175.0,
            250.0,
        )
    else:
        assert (acfg.input_size, acfg.grid, acfg.p2_size, acfg.global_proj_dim) == (64, 4, 80, 256)
        assert cfg.model.feature_size == 12 and cfg.data.preprocess.spacing == (4.0, 4.0, 4.0)


def test_every_pretrain_config_loads_strictly_and_builds_its_method_config() -> None:
    """Each shipped pretrain YAML (every method, paper scale and tiny) parses with strict keys and
    its method section validates, so a renamed key cannot hide in a config nobody runs in CI."""
    from asa3d.methods import load_builtin_methods
    from asa3d.methods.base import METHODS

    load_builtin_methods()
    paths = sorted((CONFIG_DIR / "pretrain").glob("*.yaml"))
    assert len(paths) >= 9
    names = set()
    for p in paths:
        cfg = from_dict(PretrainConfig, read_yaml(f"pretrain/{p.name}"))
        name = cfg.method["name"]
        cls = METHODS[name]
        from_dict(cls.Config, {k: v for k, v in cfg.method.items() if k != "name"}, where="method").validate()
        names.add(name)
    assert {"asa", "simmim", "swinssl", "voco"} <= names
    official = from_dict(PretrainConfig, read_yaml("pretrain/simmim_official.yaml"))
    assert official.method["optim_recipe"] == "simmim" and official.train.lr_reference_batch == 512
    assert (official.train.min_lr, official.train.warmup_start_lr) == (1e-5, 1e-6)
