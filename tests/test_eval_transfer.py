"""Weight transfer with exact key counts, refusal of partial loads, probe freezing."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import SwinUNETR

from asa3d.config_sections import ModelConfig
from asa3d.eval.probe import StrictLinearProbe, prepare_model, trainable_parameters
from asa3d.eval.transfer import InitConfig, TransferError, build_model, init_model
from asa3d.models.backbones import default_spec

SPEC3 = default_spec(ModelConfig(feature_size=12), 3)


def _model(out: int = 3, seed: int = 0) -> SwinUNETR:
    torch.manual_seed(seed)
    return build_model(ModelConfig(feature_size=12).swinunetr_kwargs(out))


def _n(model, prefix=""):
    return sum(k.startswith(prefix) for k in model.state_dict())


def test_scratch_reports_everything_missing(tmp_path):
    m = _model()
    rep = init_model(m, InitConfig(), run_dir=tmp_path)
    assert rep.kind == "scratch" and not rep.matched
    assert json.loads((tmp_path / "transfer.json").read_text())["n_missing"] == len(m.state_dict())


def test_asa3d_style_export_and_state_dict(tmp_path):
    src = _model(out=1, seed=1)  # pretraining head has 1 channel: out.* must not transfer
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("out.")}
    torch.save(state, tmp_path / "w.pt")
    m = _model(out=3)
    rep = init_model(m, InitConfig(source=str(tmp_path / "w.pt")), run_dir=tmp_path)
    total = len(m.state_dict())
    assert len(rep.matched) == total - 2 and rep.missing == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert (
        rep.expected == _n(m, "swinViT.") and rep.expected_matched == rep.expected
    )  # generic: encoder expected
    assert torch.equal(
        m.state_dict()["swinViT.patch_embed.proj.weight"], state["swinViT.patch_embed.proj.weight"]
    )
    # safetensors export with sidecar: the whole backbone (all but out.*) is expected
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "e.safetensors"))
    (tmp_path / "e.safetensors.json").write_text(
        json.dumps(
            {"preprocessing": {"spacing_mm": [1.5, 1.5, 2.0], "hu_window": [-175, 250], "orientation": "RAS"}}
        )
    )
    m2 = _model(out=3)
    rep2 = init_model(
        m2,
        InitConfig(source=str(tmp_path / "e.safetensors")),
        contract={"spacing_mm": [1.5, 1.5, 1.5], "hu_window": [-175, 250], "orientation": "RAS"},
    )
    assert rep2.kind == "asa3d-export" and rep2.expected == total - 2 == rep2.expected_matched
    assert any("spacing_mm" in w for w in rep2.warnings)  # preprocessing mismatch is reported
    # an export missing the decoder is refused (asa3d exports must carry the whole backbone)
    save_file(
        {k: v for k, v in state.items() if not k.startswith("decoder1.")}, str(tmp_path / "p.safetensors")
    )
    with pytest.raises(TransferError, match="expected keys matched"):
        init_model(_model(), InitConfig(source=str(tmp_path / "p.safetensors")))


def test_monai_swinvit_release_layout(tmp_path):
    """model_swinvit.pt: {"state_dict": {"module.*"}} with mlp.fc1/fc2 and SSL heads."""
    src = _model(seed=2)
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("swinViT."):
            k2 = "module." + k[len("swinViT.") :]
            sd[k2.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = v
    sd["module.rotation_head.weight"] = torch.zeros(4, 8)
    sd["module.contrastive_head.weight"] = torch.zeros(8, 8)
    sd["module.convTrans3d.weight"] = torch.zeros(2, 2, 1, 1, 1)
    torch.save({"state_dict": sd, "epoch": 100}, tmp_path / "model_swinvit.pt")
    m = _model()
    rep = init_model(m, InitConfig(source=str(tmp_path / "model_swinvit.pt")))
    n_vit = _n(m, "swinViT.")
    assert rep.kind == "monai-swinvit-ssl"
    assert len(rep.matched) == n_vit == rep.expected_matched == 126
    assert len(rep.missing) == len(m.state_dict()) - n_vit
    # the SSL heads have no SwinUNETR counterpart: reported under their own names
    assert sorted(rep.unexpected) == [
        "module.contrastive_head.weight",
        "module.convTrans3d.weight",
        "module.rotation_head.weight",
    ]
    # same result as MONAI's own SwinUNETR.load_from on that layout
    ref = _model()
    ref.load_from(torch.load(tmp_path / "model_swinvit.pt", weights_only=True))
    for k, v in ref.state_dict().items():
        if k.startswith("swinViT."):
            assert torch.equal(v, m.state_dict()[k]), k


def test_key_map_and_partial_refusal(tmp_path):
    src = _model(seed=3)
    sd = {
        "backbone." + k[len("swinViT.") :]: v for k, v in src.state_dict().items() if k.startswith("swinViT.")
    }
    torch.save({"model": sd}, tmp_path / "other.pt")
    with pytest.raises(TransferError, match="0 of 126"):
        init_model(_model(), InitConfig(source=str(tmp_path / "other.pt")))
    rep = init_model(_model(), InitConfig(source=str(tmp_path / "other.pt"), key_map=["backbone.:swinViT."]))
    assert len(rep.matched) == 126 and not rep.unexpected
    # only a few keys: refused unless allow_partial
    few = dict(list(sd.items())[:5])
    torch.save(few, tmp_path / "few.pt")
    cfg = InitConfig(source=str(tmp_path / "few.pt"), key_map=["backbone.:swinViT."])
    with pytest.raises(TransferError):
        init_model(_model(), cfg)
    cfg.allow_partial = True
    rep = init_model(_model(), cfg, run_dir=tmp_path)
    assert len(rep.matched) == 5 and rep.warnings
    assert json.loads((tmp_path / "transfer.json").read_text())["n_matched"] == 5


def _grads(net, x):
    net.train()
    for p in net.parameters():
        p.grad = None
    net(x).square().mean().backward()
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("freeze_encoders", [False, True])
def test_probe_freezes_encoder_and_gradients_reach_exactly_the_trainable(freeze_encoders):
    m = _model()
    net = prepare_model(m, SPEC3, "probe", freeze_encoders=freeze_encoders)
    trainable = set(trainable_parameters(net))
    assert trainable and not any(n.startswith("model.swinViT.") for n in trainable)
    if freeze_encoders:
        assert not any(n.startswith(("model.encoder1.", "model.encoder10.")) for n in trainable)
    else:
        assert any(n.startswith("model.encoder1.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    x = torch.rand(1, 1, 32, 32, 64)
    got = _grads(net, x)
    assert got == trainable
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for n, p in net.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert set(net.state_dict()) == set(m.state_dict())  # MONAI keys: loadable by predict


def test_strict_linear_probe_trains_only_the_1x1x1_conv():
    net = prepare_model(_model(), SPEC3, "strict_linear", stages=[0, 2, 4])
    assert isinstance(net, StrictLinearProbe)
    assert set(trainable_parameters(net)) == {"head.weight", "head.bias"}
    assert net.head.kernel_size == (1, 1, 1) and net.head.in_channels == 12 + 48 + 192
    out = net(torch.rand(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)
    assert _grads(net, torch.rand(1, 1, 32, 32, 32)) == {"head.weight", "head.bias"}
