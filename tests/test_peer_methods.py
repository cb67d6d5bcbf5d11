"""The three peer methods on the current contract: a tiny run drives each loss down, gradients
reach exactly the intended parts, and the transferred weights load into a plain MONAI SwinUNETR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from asa3d.config_sections import ModelConfig
from asa3d.methods.base import PretrainMethod, build_method
from asa3d.models.backbone import monai_swinunetr_kwargs

MODEL = ModelConfig(feature_size=12, window_size=4, depths=(1, 1, 1, 1), drop_path_rate=0.0)
SIMMIM = {"name": "simmim", "input_size": 64}
SWINSSL = {"name": "swinssl", "crop_size": 64, "contrastive_dim": 32}
VOCO = {
    "name": "voco",
    "volume_size": [128, 128, 64],
    "grid": 2,
    "num_random_crops": 2,
    "crop_out_size": 64,
    "proj_hidden_dim": 32,
    "proj_dim": 32,
}


@pytest.fixture(scope="module")
def volumes() -> list[torch.Tensor]:
    from asa3d.data.phantom import make_phantom

    out = []
    for i in range(3):
        img, _, _ = make_phantom((0, i), shape=(72, 72, 64), spacing=(6.0, 6.0, 6.0))
        out.append(torch.from_numpy(np.clip((img.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))[None])
    return out


def _parts_with_grad(method: PretrainMethod) -> set[str]:
    """Names down to the SwinUNETR part (``backbone.net.swinViT``, ``heads.rotation_head``, ...)."""
    out = set()
    for name, p in method.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts = name.split(".")
            cut = parts.index("net") + 2 if "net" in parts else 2
            out.add(".".join(parts[:cut]))
    return out


def _parts_trained_by_grads(method: PretrainMethod, net_prefix: str) -> dict[str, bool]:
    """The backbone spec's parts (patch_embed, layers1..4, encoders, decoder), each True when one
    of its parameters under ``net_prefix`` received a non-zero gradient."""
    hit = [
        name[len(net_prefix) :]
        for name, p in method.named_parameters()
        if name.startswith(net_prefix) and p.grad is not None and p.grad.abs().sum() > 0
    ]
    parts = method.backbone_spec().parts
    return {part: any(n.startswith(pre) for n in hit for pre in prefixes) for part, prefixes in parts.items()}


SWIN_STAGES = {"patch_embed": True, "layers1": True, "layers2": True, "layers3": True, "layers4": True}


def _loads_into_plain_swinunetr(method: PretrainMethod) -> None:
    net = SwinUNETR(**monai_swinunetr_kwargs(MODEL.swinunetr_kwargs(1)))
    result = net.load_state_dict(method.transfer_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def _step(method: PretrainMethod, opt: torch.optim.Optimizer, out) -> float:  # noqa: ANN001
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out.loss.item()


@pytest.mark.slow
def test_simmim_tiny_run(volumes: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = build_method(SIMMIM, MODEL)
    m.train()
    opt = torch.optim.Adam(list(m.trainable_parameters()), lr=1e-3)
    losses = []
    for it in range(8):
        out = m.training_step({"image": [volumes[(it + j) % 3] for j in range(2)]}, "mim")
        assert out.terms["mask_fraction"].item() == 0.5
        losses.append(_step(m, opt, out))
        if it == 0:
            got = _parts_with_grad(m)
            assert _parts_trained_by_grads(m, "backbone.net.") == m.transfer_parts()
            assert "mask_token.token" in got
            assert {
                "backbone.net.swinViT",
                "backbone.net.encoder1",
                "backbone.net.decoder1",
                "backbone.net.out",
            } <= got
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    assert m.transfer_parts() == {**SWIN_STAGES, "encoders": True, "decoder": True}
    _loads_into_plain_swinunetr(m)


def test_simmim_light_head_trains_swinvit_only(volumes: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = build_method({**SIMMIM, "head": "light", "augment": "none"}, MODEL)
    out = m.training_step({"image": volumes[:1]}, "mim")
    out.loss.backward()
    assert _parts_with_grad(m) == {"mask_token.token", "backbone.net.swinViT", "light_head.conv"}
    assert m.transfer_parts() == {**SWIN_STAGES, "encoders": False, "decoder": False}
    assert _parts_trained_by_grads(m, "backbone.net.") == m.transfer_parts()


def test_simmim_recipe_keeps_norms_biases_and_mask_token_out_of_weight_decay() -> None:
    asa = build_method({**SIMMIM, "head": "light"}, MODEL).param_groups(0.05)
    assert len(asa) == 1 and asa[0].weight_decay == 0.05  # the ASA recipe: one group
    m = build_method({**SIMMIM, "head": "light", "optim_recipe": "simmim"}, MODEL)
    groups = {g.name: g for g in m.param_groups(0.05)}
    assert set(groups) == {"decay", "no_decay"} and groups["no_decay"].weight_decay == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"].params}
    decay = {names[id(p)] for p in groups["decay"].params}
    assert "mask_token.token" in no_decay and groups["decay"].weight_decay == 0.05
    rest = no_decay - {"mask_token.token"}
    assert all(n.endswith("bias") or "norm" in n or m.get_parameter(n).ndim <= 1 for n in rest)
    assert all(m.get_parameter(n).ndim > 1 and not n.endswith("bias") for n in decay)
    assert no_decay | decay == {n for n, p in m.named_parameters() if p.requires_grad}  # nothing dropped


@pytest.mark.slow
def test_swinssl_tiny_run(volumes: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = build_method(SWINSSL, MODEL)
    m.train()
    from asa3d.methods.swinssl import random_crops

    x = random_crops(volumes[:2], 64, 1)  # fixed crops; views re-drawn from a fixed seed each step
    opt = torch.optim.Adam(list(m.trainable_parameters()), lr=5e-4)
    hist: dict[str, list[float]] = {}
    for it in range(8):
        torch.manual_seed(1)
        out = m.ssl_step(x)
        for k, v in out.terms.items():
            hist.setdefault(k, []).append(v.item())
        hist.setdefault("loss", []).append(_step(m, opt, out))
        if it == 0:
            want = {**SWIN_STAGES, "encoders": False, "decoder": False}
            assert _parts_trained_by_grads(m, "backbone.net.") == want
            assert _parts_with_grad(m) == {
                "backbone.net.swinViT",
                "heads.rotation_head",
                "heads.contrastive_head",
                "heads.inpainting_head",
            }
    for key in ("loss", "rot", "rec"):
        assert np.mean(hist[key][-2:]) < np.mean(hist[key][:2]), (key, hist[key])
    # a real step from whole volumes: crops_per_volume crops each, two views per crop
    out = m.training_step({"image": volumes[:1]}, "ssl")
    assert torch.isfinite(out.loss)
    assert m.transfer_parts() == {**SWIN_STAGES, "encoders": False, "decoder": False}
    _loads_into_plain_swinunetr(m)


@pytest.mark.slow
def test_voco_tiny_run(volumes: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    m = build_method(VOCO, MODEL)
    m.train()
    views = m.make_views(volumes[:1])
    assert views.bases.shape == (1, 4, 1, 64, 64, 64) and views.crops.shape == (1, 2, 1, 64, 64, 64)
    assert torch.allclose(views.labels.sum(-1), torch.ones(1, 2))
    opt = torch.optim.Adam(list(m.trainable_parameters()), lr=1e-4)
    losses = []
    for it in range(6):  # fixed views: the same crops every step
        losses.append(_step(m, opt, m.voco_step(views)))
        if it == 0:
            enc = {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"}
            assert _parts_with_grad(m) == {f"student.backbone.net.{e}" for e in enc} | {"student.projector"}
            assert _parts_trained_by_grads(m, "student.backbone.net.") == m.transfer_parts()
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    # the label-vs-logit dump: on multiples of log_labels_every, the first random crop per base
    from asa3d.methods.voco_losses import voco_logits

    with torch.no_grad():
        m.voco_step(views)  # no optimiser step after it: the same weights give the same logits
        s_bases, s_crops = m._embed(m.student, views)
    assert m.on_step_end("voco", 101, 1000) == {}
    dump = m.on_step_end("voco", 200, 1000)
    assert set(dump) == {f"voco_{k}/base{j}" for k in ("labels", "logits") for j in range(4)}
    assert [dump[f"voco_labels/base{j}"] for j in range(4)] == pytest.approx(views.labels[0, 0].tolist())
    want = voco_logits(s_crops, s_bases)[0, 0].tolist()
    assert [dump[f"voco_logits/base{j}"] for j in range(4)] == pytest.approx(want, abs=1e-5)
    assert m.transfer_parts() == {**SWIN_STAGES, "encoders": True, "decoder": False}
    _loads_into_plain_swinunetr(m)


def test_voco_ema_teacher_moves_once_per_optimiser_step_and_gets_no_gradient(
    volumes: list[torch.Tensor],
) -> None:
    """The released code's teacher on the student-teacher base: initialised at random and moved
    with the initial student (the code's update before its first teacher forward), then moved by
    the constant momentum 0.9 in ``on_step_end`` only: forwards (micro-batches) leave it alone."""
    from asa3d.methods.student_teacher import StudentTeacherMethod
    from asa3d.models.backbone import SwinBackbone

    torch.manual_seed(0)
    m = build_method({**VOCO, "voco_teacher": "ema", "teacher_init": "random"}, MODEL)
    assert isinstance(m, StudentTeacherMethod)
    m.train()
    assert not m.teacher.training and all(not p.requires_grad for p in m.teacher.parameters())
    name = "backbone.net.swinViT.patch_embed.proj.weight"
    torch.manual_seed(0)  # replay the construction: the student, then the independent random teacher
    s0 = dict(SwinBackbone(MODEL, out_channels=1).named_parameters())["net.swinViT.patch_embed.proj.weight"]
    t0 = dict(m.teacher.named_parameters())[name].clone()
    assert torch.equal(dict(m.student.named_parameters())[name], s0)
    assert not torch.allclose(t0, s0)
    views = m.make_views(volumes[:1])
    opt = torch.optim.SGD(list(m.trainable_parameters()), lr=0.5)
    for _ in range(2):  # two micro-batches of one optimiser step (gradient accumulation)
        (m.voco_step(views).loss / 2).backward()
    assert torch.equal(dict(m.teacher.named_parameters())[name], t0)  # forwards never move it
    assert all(p.grad is None for p in m.teacher.parameters())
    trainable = {id(p) for p in m.trainable_parameters()}
    assert not any(id(p) in trainable for p in m.teacher.parameters())
    opt.step()
    s1 = dict(m.student.named_parameters())[name].detach().clone()
    assert not torch.equal(s1, s0)
    logged = m.on_step_end("voco", 1, 10)
    assert logged["ema_momentum"] == 0.9  # constant: no cosine schedule
    torch.testing.assert_close(dict(m.teacher.named_parameters())[name], 0.9 * t0 + 0.1 * s1)
    copy = build_method({**VOCO, "voco_teacher": "ema"}, MODEL)
    assert torch.equal(
        dict(copy.teacher.named_parameters())[name], dict(copy.student.named_parameters())[name]
    )
    none = build_method(VOCO, MODEL)  # the CVPR paper: no teacher, no EMA
    assert not hasattr(none, "teacher") and "ema_momentum" not in none.on_step_end("voco", 0, 10)


def test_voco_warns_when_label_error_does_not_fall_after_warm_up(caplog) -> None:  # noqa: ANN001
    def feed(errors: list[float], patience: int = 1, teacher: str = "none") -> list[str]:
        keys = {"track_after": 2, "track_window": 3, "track_patience": patience, "voco_teacher": teacher}
        m = build_method({**VOCO, **keys}, MODEL)
        caplog.clear()
        with caplog.at_level("WARNING", logger="asa3d.methods.voco"):
            for i, e in enumerate(errors):
                m._last_error = e
                m.on_step_end("voco", i, 100)
        return [r.getMessage() for r in caplog.records]

    # warm-up steps 0-1 ignored; first window 0.5; every later window has fallen: no warning
    assert feed([0.9, 0.9, 0.5, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3]) == []
    msgs = feed([0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.49, 0.5, 0.5, 0.5, 0.5])
    assert len(msgs) == 1 and "has not fallen after warm-up" in msgs[0] and "voco_teacher=ema" in msgs[0]
    assert "iteration 7" in msgs[0]  # decided after two full windows, and said once
    (ema,) = feed([0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.49, 0.5], teacher="ema")  # with a teacher: no such advice
    assert "voco_teacher=ema" not in ema and "train.lr" in ema
    flat = [0.1, 0.1, 0.5, 0.5, 0.5] + [0.5] * 3 + [0.4] * 3 + [0.5] * 3  # checks at 7, 10, 13
    assert feed(flat, patience=2) == []  # fail, pass (resets the count), fail: never 2 in a row ...
    msgs = feed([*flat, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], patience=2)  # ... until the checks at 13 and 16
    assert len(msgs) == 1 and "iteration 16" in msgs[0] and "2 checks in a row" in msgs[0]


def test_swinssl_weights_in_the_released_layout_load_like_ours(tmp_path) -> None:  # noqa: ANN001
    """Our Swin SSL transfer weights, written in the layout of MONAI's released ``model_swinvit.pt``
    (``module.*`` without ``swinViT.``, ``mlp.fc1/fc2``), load into the same ``swinViT`` tensors."""
    from asa3d.eval.transfer import load_into, read_source

    torch.manual_seed(0)
    ours = build_method(SWINSSL, MODEL).transfer_state_dict()
    released = {
        "module."
        + k[len("swinViT.") :].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2."): v
        for k, v in ours.items()
        if k.startswith("swinViT.")
    }
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": released}, path)
    state, kind, _ = read_source(str(path))
    assert kind == "monai-swinvit-ssl"
    a = SwinUNETR(**monai_swinunetr_kwargs(MODEL.swinunetr_kwargs(3)))
    b = SwinUNETR(**monai_swinunetr_kwargs(MODEL.swinunetr_kwargs(3)))
    ra = load_into(a, state, kind=kind)
    load_into(
        b, {k: v for k, v in ours.items() if k.startswith("swinViT.")}, kind="state-dict", expect="encoder"
    )
    assert ra.expected_matched == ra.expected == sum(k.startswith("swinViT.") for k in ours)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("swinViT."))


def test_swinssl_foreground_boxes_keep_the_body_in_every_crop() -> None:
    """The released code crops to the body (MONAI CropForeground, k_divisible = S) before its random
    crops: a 60x40x40 body in a 160x160x128 volume gives one 64^3 box holding all of it."""
    from asa3d.methods.swinssl import foreground_boxes, random_crops

    v = torch.zeros(1, 160, 160, 128)
    v[0, 40:100, 50:90, 30:70] = 1.0
    (box,) = foreground_boxes([v], 64)
    assert box.shape == (1, 64, 64, 64) and box.sum().item() == 60 * 40 * 40
    torch.manual_seed(0)
    assert (random_crops([box], 64, 4).flatten(1).sum(1) == 60 * 40 * 40).all()
    anywhere = random_crops([v], 64, 32).flatten(1).sum(1)
    assert (anywhere < 60 * 40 * 40).any()  # without it most crops miss part of the body
    small = torch.ones(1, 40, 40, 40)  # smaller than S: padded to S first, as SpatialPad
    assert foreground_boxes([small], 64)[0].shape == (1, 64, 64, 64)


def test_swinssl_global_negatives_come_from_the_dist_context(volumes: list[torch.Tensor]) -> None:
    """Under several ranks the contrastive term's candidates are every rank's embeddings, gathered
    with their gradient through the method's DistContext with this rank's rows at rank * n (that
    the gradients then equal one process's: tests/test_peers_ddp.py)."""
    from asa3d.methods.dist_context import DistContext
    from asa3d.methods.swinssl import random_crops
    from asa3d.methods.swinssl_losses import nt_xent

    other = torch.randn(4, 32)

    class TwoRanks(DistContext):
        def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
            self.calls = getattr(self, "calls", 0) + 1
            return torch.cat([other[: tensor.shape[0]], tensor])  # this rank is rank 1

    m = build_method(SWINSSL, MODEL)
    m.eval()
    x = random_crops(volumes[:1], 64, 2)
    torch.manual_seed(3)
    local = m.ssl_step(x).terms["con"].item()
    m.dist = TwoRanks(rank=1, world_size=2)
    torch.manual_seed(3)
    out = m.ssl_step(x)
    assert m.dist.calls == 2  # type: ignore[attr-defined]
    torch.manual_seed(3)
    v = m.make_views(x)
    with torch.no_grad():
        _, con, _ = m.heads(m.backbone.encode(v["input"], 4)[4])
    z1, z2 = con[:2], con[2:]
    a1, a2 = torch.cat([other[:2], z1]), torch.cat([other[:2], z2])
    assert out.terms["con"].item() == pytest.approx(nt_xent(z1, z2, 0.5, a1, a2, 2).item(), rel=1e-5)
    assert out.terms["con"].item() != pytest.approx(local, rel=1e-3)
    m.dist = TwoRanks(rank=1, world_size=2)
    m.cfg.contrastive_negatives = "local"
    torch.manual_seed(3)
    assert m.ssl_step(x).terms["con"].item() == pytest.approx(local, rel=1e-6)
