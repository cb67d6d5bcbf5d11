"""The method contract's defaults (methods/base.py), the registry and its loader, the student-teacher
base and the distributed context's single-process behaviour and collective wiring (the collectives
replaced by fakes, so no process group is needed)."""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import asa3d.methods as methods_pkg
from asa3d.config import ConfigError
from asa3d.config_sections import ModelConfig
from asa3d.data.sampling import SampleSpec
from asa3d.methods.base import METHODS, PretrainMethod, StepOutput, build_method, register_method
from asa3d.methods.dist_context import (
    BUFFER_POLICIES,
    DistContext,
    _AllReduceSum,
    all_reduce_sum_with_grad,
    resolve_buffer_policies,
)
from asa3d.methods.student_teacher import StudentTeacherMethod
from asa3d.models.backbones.swinunetr import swinunetr_spec

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1))


@dataclass
class ToyConfig:
    width: int = 3
    ema_momentum_start: float = 0.5

    def validate(self) -> None:
        if self.width < 1:
            raise ConfigError("method.width must be positive")


class Toy(PretrainMethod):
    name = "contract_toy"
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.lin = nn.Linear(cfg.width, 2)
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def phases(self) -> list[str]:
        return ["only"]

    def training_step(self, batch, phase):  # noqa: ANN001, ANN201
        return StepOutput(self.lin(batch["image"]).sum())

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        return {}


# ---- base contract -------------------------------------------------------------------------------
def test_defaults_of_the_contract() -> None:
    m = Toy(ToyConfig(), MODEL)
    assert m.cfg.width == 3 and m.model_cfg is MODEL
    assert isinstance(m.dist, DistContext) and (m.dist.rank, m.dist.world_size) == (0, 1)
    assert not m.dist.distributed
    assert m.sample_spec("only") == SampleSpec() and isinstance(m.sample_spec("only"), SampleSpec)
    assert m.stage_starts(10) == (0,)
    assert m.on_step_end("only", 3, 10) == {}
    assert m.buffer_policy() == {} and m.monitor_embeddings({}) == {} and m.image_summaries({}, "only") == {}
    assert StepOutput(torch.zeros(())).terms == {}
    trainable = list(m.trainable_parameters())
    assert [id(p) for p in trainable] == [id(p) for p in (*m.lin.parameters(), *m.norm.parameters())]


def test_param_groups_one_group_or_the_decay_split() -> None:
    m = Toy(ToyConfig(), MODEL)
    assert Toy.no_decay_on_norm_and_bias is False
    (g,) = m.param_groups(0.05)
    assert (g.name, g.weight_decay, g.lr_scale) == ("all", 0.05, 1.0)
    assert [id(p) for p in g.params] == [id(p) for p in m.trainable_parameters()]
    m.no_decay_on_norm_and_bias = True  # type: ignore[misc]
    groups = {g.name: g for g in m.param_groups(0.05)}
    assert set(groups) == {"decay", "no_decay"}
    assert [id(p) for p in groups["decay"].params] == [id(m.lin.weight)]
    assert {id(p) for p in groups["no_decay"].params} == {id(m.lin.bias), id(m.norm.weight), id(m.norm.bias)}
    assert groups["decay"].weight_decay == 0.05 and groups["no_decay"].weight_decay == 0.0


def test_param_groups_cover_only_what_trainable_parameters_yields() -> None:
    class HeadOnly(Toy):  # a method that trains only part of its trainable-looking weights
        no_decay_on_norm_and_bias = True

        def trainable_parameters(self):  # noqa: ANN202
            return iter([self.lin.weight, self.lin.bias])

    m = HeadOnly(ToyConfig(), MODEL)
    groups = {g.name: [id(p) for p in g.params] for g in m.param_groups(0.1)}
    assert groups == {"decay": [id(m.lin.weight)], "no_decay": [id(m.lin.bias)]}  # no norm weights


def test_backbone_spec_parts_and_kwargs() -> None:
    m = Toy(ToyConfig(), MODEL)
    spec = m.backbone_spec()
    assert spec == swinunetr_spec(MODEL, 1) and spec.kwargs["out_channels"] == 1
    assert m.transfer_parts() == {p: True for p in spec.parts} and len(spec.parts) == 7
    assert m.backbone_kwargs() == dict(spec.kwargs)
    kw = m.backbone_kwargs(5)
    assert kw["out_channels"] == 5 and kw["feature_size"] == 12
    assert {k: v for k, v in kw.items() if k != "out_channels"} == {
        k: v for k, v in spec.kwargs.items() if k != "out_channels"
    }


def test_register_and_build(monkeypatch) -> None:  # noqa: ANN001
    class Nameless(Toy):
        name = ""

    with pytest.raises(ValueError, match="^Nameless must set a non-empty `name`$"):
        register_method(Nameless)
    assert "" not in METHODS
    try:
        assert register_method(Toy) is Toy and METHODS["contract_toy"] is Toy
        m = build_method({"name": "contract_toy", "width": 4}, MODEL)
        assert type(m) is Toy and m.cfg == ToyConfig(width=4) and m.model_cfg is MODEL
        assert m.lin.in_features == 4
        with pytest.raises(ConfigError, match=r"^method\.width must be positive$"):  # the Config validates
            build_method({"name": "contract_toy", "width": 0}, MODEL)
        with pytest.raises(ConfigError, match=r"^method: unknown key\(s\) \['depth'\]"):
            build_method({"name": "contract_toy", "depth": 1}, MODEL)
        section = {"name": "contract_toy"}
        build_method(section, MODEL)
        assert section == {"name": "contract_toy"}  # the caller's mapping is left alone
    finally:
        METHODS.pop("contract_toy", None)
    known = sorted(METHODS)
    loaded = []
    monkeypatch.setattr(methods_pkg, "load_builtin_methods", lambda: loaded.append(True))
    with pytest.raises(ConfigError) as err:
        build_method({"name": "nope"}, MODEL)
    assert str(err.value) == f"method.name='nope' is not a known method. Known: {known}."
    with pytest.raises(ConfigError, match=re.escape("method.name=None is not a known method.")):
        build_method({}, MODEL)
    assert loaded == [True, True]  # the built-in methods are registered before the lookup


# ---- the registry loader -------------------------------------------------------------------------
def test_builtin_methods_are_all_imported_and_registered(monkeypatch) -> None:  # noqa: ANN001
    seen = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: seen.append(name) or real(name))
    methods_pkg.load_builtin_methods()
    assert seen == [
        "asa3d.methods.asa",
        "asa3d.methods.simmim",
        "asa3d.methods.swinssl",
        "asa3d.methods.voco",
        "asa3d.methods.adam",
    ]
    assert {"asa", "simmim", "swinssl", "voco", "adam"} <= set(METHODS)
    assert set(methods_pkg.__all__) == {
        "METHODS",
        "PretrainMethod",
        "SampleSpec",
        "StepOutput",
        "build_method",
        "load_builtin_methods",
        "register_method",
    }


def test_a_missing_builtin_is_skipped_but_a_broken_one_raises(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "asa3d_broken_method_mod.py").write_text("import asa3d_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods_pkg, "BUILTIN_METHOD_MODULES", ("asa3d.methods.not_there_xyz",))
    methods_pkg.load_builtin_methods()  # a method module that is not installed: skipped
    monkeypatch.setattr(methods_pkg, "BUILTIN_METHOD_MODULES", ("asa3d_broken_method_mod",))
    with pytest.raises(ModuleNotFoundError) as err:  # one whose own import fails: not hidden
        methods_pkg.load_builtin_methods()
    assert err.value.name == "asa3d_no_such_dependency_xyz"


# ---- student-teacher base ------------------------------------------------------------------------
class ST(StudentTeacherMethod):
    name = "st_contract"

    def __init__(self, m0: float = 0.5) -> None:
        super().__init__(ToyConfig(ema_momentum_start=m0), MODEL)
        self.init_teacher(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))

    def phases(self) -> list[str]:
        return ["a"]

    def training_step(self, batch, phase):  # noqa: ANN001, ANN201
        return StepOutput(self.student(batch["image"]).sum())

    def transfer_state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()


def test_student_teacher_defaults_and_schedule() -> None:
    m = ST(0.8)
    assert m.ema_prefixes("a") is None
    assert m.ema_momentum_start() == 0.8 and isinstance(m.ema_momentum_start(), float)
    assert m.momentum(0, 10) == pytest.approx(0.8)
    assert m.momentum(5, 10) == pytest.approx(1 - 0.2 * (1 + math.cos(math.pi / 2)) / 2)
    assert m.momentum(2, 10) == pytest.approx(1 - 0.2 * (1 + math.cos(math.pi * 0.2)) / 2)
    assert list(m.state_dict()) == [
        "student.0.weight",
        "student.0.bias",
        "teacher.0.weight",
        "teacher.0.bias",
    ]
    assert m.train(False) is m and not m.student.training and not m.teacher.training
    assert m.train() is m and m.student.training and not m.teacher.training
    assert (
        torch.equal(m.teacher[0].weight, m.student[0].weight)
        and m.teacher[0].weight is not m.student[0].weight
    )


def test_on_step_end_updates_every_pair_by_the_scheduled_momentum() -> None:
    m = ST(0.5)
    with torch.no_grad():
        m.student[0].weight.fill_(1.0)
        m.student[0].bias.fill_(-1.0)
        m.teacher[0].weight.fill_(0.0)
        m.teacher[0].bias.fill_(0.0)
    out = m.on_step_end("a", 5, 10)
    mom = 1 - 0.5 * (1 + math.cos(math.pi / 2)) / 2  # 0.75
    assert out == {"ema_momentum": pytest.approx(mom)}
    torch.testing.assert_close(m.teacher[0].weight, torch.full((2, 2), 1 - mom))
    torch.testing.assert_close(m.teacher[0].bias, torch.full((2,), -(1 - mom)))
    assert m.student[0].weight.eq(1.0).all()  # the student is not touched


# ---- distributed context -------------------------------------------------------------------------
def test_single_process_context_is_the_identity() -> None:
    ctx = DistContext("2", "1")  # type: ignore[arg-type]
    assert (ctx.rank, ctx.world_size) == (2, 1) and isinstance(ctx.rank, int) and not ctx.distributed
    assert DistContext(0, 2).distributed
    t = torch.arange(6.0).view(3, 2)
    assert ctx.all_gather(t) is t and ctx.all_gather_with_grad(t) is t
    assert all_reduce_sum_with_grad(t) is t
    assert BUFFER_POLICIES == ("broadcast", "sync_bn", "gathered", "local")


def test_all_gather_concatenates_every_rank_in_order(monkeypatch) -> None:  # noqa: ANN001
    def fake_all_gather(parts: list[torch.Tensor], t: torch.Tensor) -> None:
        assert t.is_contiguous() and not t.requires_grad
        for r, p in enumerate(parts):
            assert p.shape == t.shape
            p.copy_(t + 10 * r)

    monkeypatch.setattr(torch.distributed, "all_gather", fake_all_gather)
    x = torch.arange(4.0, requires_grad=True).view(2, 2).t()  # not contiguous
    out = DistContext(1, 3).all_gather(x)
    assert out.shape == (6, 2) and not out.requires_grad
    assert out.tolist() == (torch.cat([x + 0, x + 10, x + 20])).tolist()


@pytest.mark.parametrize(("rank", "world"), [(0, 2), (1, 3), (2, 3)])
def test_all_gather_with_grad_places_this_ranks_rows(rank: int, world: int) -> None:
    # no process group: the sum over ranks is the identity, so the padded rows are what is summed
    x = torch.arange(1.0, 7.0).view(2, 3).requires_grad_(True)
    out = DistContext(rank, world).all_gather_with_grad(x)
    assert out.shape == (2 * world, 3)
    want = torch.zeros(2 * world, 3)
    want[2 * rank : 2 * rank + 2] = x.detach()
    assert torch.equal(out, want)
    (out * torch.arange(2.0 * world * 3).view(-1, 3)).sum().backward()
    assert torch.equal(x.grad, torch.arange(2.0 * world * 3).view(-1, 3)[2 * rank : 2 * rank + 2])
    x3 = torch.ones(1, 2, 2)
    out3 = DistContext(rank, world).all_gather_with_grad(x3)  # only dim 0 is padded
    assert out3.shape == (world, 2, 2) and out3.sum().item() == 4.0 and out3[rank].eq(1).all()


def test_all_reduce_sum_goes_through_the_collective_in_both_directions(monkeypatch) -> None:  # noqa: ANN001
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> None:
        calls.append(t.shape)
        t.mul_(3.0)  # as if three ranks held the same tensor

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    assert all_reduce_sum_with_grad(x) is x and calls == []  # one rank: nothing to sum
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    out = all_reduce_sum_with_grad(x)
    assert out.tolist() == [3.0, 6.0] and x.tolist() == [1.0, 2.0]  # the input is not summed in place
    g = torch.tensor([1.0, -1.0])
    out.backward(g)
    assert x.grad.tolist() == [3.0, -3.0] and g.tolist() == [1.0, -1.0] and len(calls) == 2
    y = torch.tensor([5.0], requires_grad=True)
    assert _AllReduceSum.apply(y).tolist() == [15.0] and y.tolist() == [5.0]


# ---- buffer policies -----------------------------------------------------------------------------
def test_buffer_policies_longest_prefix_wins() -> None:
    names = ["queue", "queue_ptr", "bn.running_mean", "bn.running_var", "head.bn.running_mean", "other"]
    got = resolve_buffer_policies(names, {"queue": "gathered", "queue_ptr": "local", "head.": "sync_bn"})
    assert got == {
        "queue": "gathered",
        "queue_ptr": "local",  # the longer prefix
        "bn.running_mean": "broadcast",
        "bn.running_var": "broadcast",
        "head.bn.running_mean": "sync_bn",
        "other": "broadcast",
    }
    assert resolve_buffer_policies(names, {}) == {n: "broadcast" for n in names}
    assert resolve_buffer_policies(["a.b"], {"a.b": "local"}) == {"a.b": "local"}  # an exact name


def test_buffer_policy_refusals_name_the_prefix() -> None:
    names = [f"b{i}" for i in range(10)]
    with pytest.raises(ValueError) as err:
        resolve_buffer_policies(names, {"b1": "mirror"}, where="Toy.buffer_policy()")
    assert str(err.value) == (
        "Toy.buffer_policy(): 'b1' -> 'mirror'; choose one of ['broadcast', 'sync_bn', 'gathered', 'local']"
    )
    with pytest.raises(ValueError) as err:
        resolve_buffer_policies(names, {"x": "local"})
    assert str(err.value) == (
        "buffer_policy(): prefix 'x' matches no buffer "
        "(buffers: ['b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7'])"
    )
    for policy in BUFFER_POLICIES:
        assert resolve_buffer_policies(["b1"], {"b": policy}) == {"b1": policy}
