"""Eve tools on tiny untrained MONAI ResNets: embeddings, crop geometry, matching, pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from PIL import Image

from asa3d.data.montage import oriented_slice
from asa3d.eve.correspondence import draw_correspondences, draw_correspondences_3d, match_features
from asa3d.eve.embed import (
    EveEncoder,
    as_encoder,
    crop_embeddings,
    crop_images,
    dense_embeddings,
    resnet_features,
)
from asa3d.eve.figure_io import new_figure, save_png
from asa3d.eve.landmarks import label_landmarks, mask_landmarks
from asa3d.eve.tsne import (
    LandmarkEmbeddings,
    landmark_embeddings,
    landmark_scores,
    plot_landmark_tsne,
    tsne_2d,
)
from asa3d.eve.whole_parts import draw_whole_parts, whole_parts_similarity


def _net(dims: int, in_ch: int = 1) -> ResNet:
    torch.manual_seed(0)
    net = ResNet(
        "basic", [1, 1, 1, 1], [4, 8, 8, 8], spatial_dims=dims, n_input_channels=in_ch, feed_forward=False
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.train()


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *shape), generator=g)


def _dpi(path: Path) -> float:
    with Image.open(path) as im:
        return float(im.info["dpi"][0])


@pytest.mark.parametrize(("dims", "shape"), [(2, (32, 40)), (3, (24, 24, 16))])
def test_identical_inputs_give_identical_embeddings(dims: int, shape: tuple[int, ...]) -> None:
    net = _net(dims)
    x = _image(shape)
    other = _image(shape, seed=1)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    a = dense_embeddings(net, torch.stack([x, other]))
    b = dense_embeddings(net, torch.stack([x, x]))
    assert a.shape == (2, 8, *shape)  # upsampled to the input grid
    assert torch.equal(a[0], b[0]) and torch.equal(b[0], b[1])  # batch-independent, repeatable
    assert torch.allclose(a.norm(dim=1), torch.ones(2, *shape), atol=1e-5)
    assert net.training  # the caller's mode is restored ...
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())  # ... BN stats untouched
    assert not torch.equal(a[0], a[1])


def test_crop_embedding_geometry_is_exact() -> None:
    net = _net(2)
    img = _image((32, 32))
    gap = resnet_features(net, img[None]).flatten(2).mean(-1)[0]
    whole = crop_embeddings(net, img, [[15.5, 15.5]], 32, 32)[0]  # centre of a 32-px image, full size
    assert torch.allclose(whole, gap, atol=1e-5)
    sub = img[:, 4:20, 8:24]  # a 16x16 crop at pixel centre (11.5, 15.5): identity resampling
    ref = resnet_features(net, sub[None]).flatten(2).mean(-1)[0]
    assert torch.allclose(crop_embeddings(net, img, [[11.5, 15.5]], [[16.0]], 16)[0], ref, atol=1e-5)
    rgb = _net(2, in_ch=3)
    grey = crop_embeddings(rgb, img, [[15.5, 15.5]], 32, 32)
    assert torch.allclose(grey, crop_embeddings(rgb, img.expand(3, -1, -1), [[15.5, 15.5]], 32, 32))
    with pytest.raises(ValueError, match="sizes"):
        crop_embeddings(net, img, [[1, 1], [2, 2]], torch.ones(3, 2), 16)


def test_match_features_finds_a_known_shift() -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(16, 6, 6, generator=g)
    fb = torch.roll(fa, shifts=(1, 2), dims=(1, 2))  # B's cell (i+1, j+2) holds A's cell (i, j)
    m = match_features(fa, fb, (48, 48), (48, 48), top_k=50)
    assert len(m.similarity) == 36 and np.allclose(m.similarity, 1.0, atol=1e-5)
    shift = np.mod(m.points_b - m.points_a, 48)  # one cell = 8 px
    assert np.allclose(shift, [8.0, 16.0])
    assert list(m.similarity) == sorted(m.similarity, reverse=True)
    assert len(match_features(fa, fb, (48, 48), (48, 48), top_k=5).similarity) == 5


def test_correspondence_pictures_2d_and_3d(tmp_path: Path) -> None:
    net2, net3 = _net(2), _net(3)
    a, b = _image((32, 32)), _image((32, 32), seed=1)
    m = match_features(
        resnet_features(net2, a[None])[0], resnet_features(net2, b[None])[0], (32, 32), (32, 32)
    )
    p = draw_correspondences(a[0].numpy(), b[0].numpy(), m, tmp_path / "c2d.png")
    assert p.stat().st_size > 5000 and _dpi(p) >= 150
    va, vb = _image((24, 24, 16))[0].numpy(), _image((24, 24, 16), seed=2)[0].numpy()
    fa = resnet_features(net3, torch.from_numpy(va)[None, None])[0]
    fb = resnet_features(net3, torch.from_numpy(vb)[None, None])[0]
    p3, found = draw_correspondences_3d(va, vb, fa, fb, (12, 12, 8), (12, 12, 8), tmp_path / "c3d.png")
    assert p3.stat().st_size > 5000 and _dpi(p3) >= 150
    assert set(found) == {"axial", "coronal", "sagittal"} and all(len(v.similarity) for v in found.values())
    # every match lies inside its slice (axial (y, x) rows x cols = 24 x 24, coronal z x x = 16 x 24)
    assert (found["coronal"].points_a[:, 0] < 16).all() and (found["coronal"].points_a[:, 1] < 24).all()
    with pytest.raises(ValueError, match="dpi"):
        save_png(new_figure(1, 1), tmp_path / "low.png", dpi=72)


def test_landmark_tsne_scores_and_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    vec = np.concatenate([centres[lm] + rng.normal(size=16) * 0.1 for lm in range(3) for _ in range(3 * 4)])
    vec = vec.reshape(36, 16).astype(np.float32)
    lm = np.repeat(np.arange(3), 12)
    le = LandmarkEmbeddings(vec, lm, np.tile(np.arange(3), 12), np.tile(np.repeat(np.arange(4), 3), 3),
                            ["a", "b", "c"], [8.0, 16.0, 24.0])  # fmt: skip
    s = landmark_scores(le)
    assert (
        s["silhouette"] > 0.8
        and s["knn_accuracy"] == 1.0
        and s["same_landmark_cos"] > s["other_landmark_cos"]
    )
    shuffled = LandmarkEmbeddings(vec, rng.permutation(lm), le.scale, le.image, le.names, le.scales)
    assert landmark_scores(shuffled)["silhouette"] < 0.2  # the scores can fail
    xy = tsne_2d(vec, seed=0)
    assert xy.shape == (36, 2) and np.isfinite(xy).all()
    p = plot_landmark_tsne(xy, le, tmp_path / "tsne.png", scores=s)
    assert p.stat().st_size > 5000 and _dpi(p) >= 150


def test_landmark_embeddings_from_masks() -> None:
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, 4:8, 4:8] = 1
    masks[1, 20:30, 10:20] = 1
    lms = mask_landmarks(masks, ["x", "y"], wanted=["y", "x", "z"])
    assert list(lms) == ["y", "x"] and np.allclose(lms["y"], [24.5, 14.5])
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:4, 2:4, 2:4] = 3
    assert np.allclose(label_landmarks(lab, {0: "bg", 3: "liver"})["liver"], [2.5, 2.5, 2.5])
    net = _net(2)
    le = landmark_embeddings(net, [_image((32, 32)), _image((32, 32), 1)], [lms, lms], [8, 12, 16], 16)
    assert le.vectors.shape == (12, 8) and le.names == ["y", "x"]
    assert le.landmark.tolist() == [0, 0, 0, 1, 1, 1] * 2 and le.image.tolist() == [0] * 6 + [1] * 6


@pytest.mark.parametrize("dims", [2, 3])
def test_whole_vs_parts_table(tmp_path: Path, dims: int) -> None:
    net = _net(dims)
    shape = (32, 32) if dims == 2 else (24, 24, 24)
    imgs = [_image(shape), _image(shape, 1)]
    c = [s / 2 - 0.5 for s in shape]
    wholes = [[(c, 16.0), ([x + 4 for x in c], 12.0)]] * 2
    r = whole_parts_similarity(net, imgs, wholes, 16)
    splits = ["1x2", "3x1", "2x2"] if dims == 2 else ["2x2x2"]
    assert list(r.cosine) == splits and all(len(v) == 4 for v in r.cosine.values())
    # by hand for the first whole and the last split
    split = (2, 2) if dims == 2 else (2, 2, 2)
    e_w = crop_embeddings(net, imgs[0], [c], 16.0, 16)[0]
    offs = np.stack(np.meshgrid(*[np.arange(n) for n in split], indexing="ij"), -1).reshape(-1, dims)
    parts = np.asarray(c) - 8 + (offs + 0.5) * 8
    e_p = crop_embeddings(net, imgs[0], parts, 8.0, 16).mean(0)
    assert r.cosine[splits[-1]][0] == pytest.approx(torch.cosine_similarity(e_w, e_p, dim=0).item(), abs=1e-5)
    md = r.markdown()
    assert md.count("\n") == 2 + len(splits) and "baseline" in md
    p = draw_whole_parts(r, tmp_path / "wp.png", tmp_path / "wp.md")
    assert p.stat().st_size > 5000 and _dpi(p) >= 150 and (tmp_path / "wp.md").read_text() == md


# ---- SwinUNETR, loading, copies, localisation, scores (untrained networks) -----------------------
def _swin() -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3),
        window_size=4, spatial_dims=3,
    ).train()  # fmt: skip


def test_swinunetr_crop_and_dense_embeddings() -> None:
    from asa3d.eve.embed import swin_features
    from asa3d.models.backbones.swinunetr import swin_hidden_states

    net = _swin()
    enc = as_encoder(net)
    assert (enc.kind, enc.pool_stage, enc.dense_stage) == ("swinunetr", 4, 3)  # pooled h4, dense h3
    vol = _image((32, 32, 32))
    h3 = swin_features(net, vol[None], 3)
    assert h3.shape == (1, 96, 2, 2, 2) and net.training  # 8F channels, one token per 16^3; mode restored
    enc.input_size = 32
    whole = crop_embeddings(enc, vol, [[15.5, 15.5, 15.5]], 32)[0]  # the whole volume: identity resampling
    with torch.no_grad():
        ref = swin_hidden_states(net.eval(), vol[None], 4)[4].flatten(2).mean(-1)[0]
    assert whole.shape == (192,) and torch.allclose(whole, ref, atol=1e-5)
    other = _image((32, 32, 32), seed=1)
    two = crop_embeddings(enc, torch.cat([vol, other])[:1], [[15.5] * 3, [8.0, 9.0, 10.0]], 16)
    one = crop_embeddings(enc, vol, [[8.0, 9.0, 10.0]], 16)
    assert torch.allclose(two[1], one[0], atol=1e-5)  # no batch dependence (LayerNorm / InstanceNorm)
    assert dense_embeddings(enc, vol[None]).shape == (1, 96, 32, 32, 32)


def _fake_export(tmp_path: Path, net: torch.nn.Module, spec, method: str, parts: dict, cfg: dict) -> Path:
    import json

    from safetensors.torch import save_file

    out = tmp_path / f"{method}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    side = {"backbone": spec.to_dict(), "method": method, "method_config": cfg, "transfer_parts": parts,
            "preprocessing": {"spacing_mm": [8.0, 8.0, 8.0], "hu_window": [-175.0, 250.0]}}  # fmt: skip
    out.with_name(out.name + ".json").write_text(json.dumps(side))
    return out


def test_load_encoder_reads_exports_and_refuses_what_has_no_dense_features(tmp_path: Path) -> None:
    from asa3d.config_sections import ModelConfig
    from asa3d.engine.checkpoint import CheckpointError
    from asa3d.eve.load import load_encoder
    from asa3d.models.backbones.swinunetr import swinunetr_spec

    spec = swinunetr_spec(
        ModelConfig(feature_size=12, depths=[1, 1, 1, 1], num_heads=[3, 3, 3, 3], window_size=4)
    )
    torch.manual_seed(0)
    net = spec.build()
    parts = {p: p not in ("layers4", "encoders", "decoder") for p in spec.parts}  # ASA without L_var
    path = _fake_export(tmp_path, net, spec, "asa", parts, {"input_size": 64})
    le = load_encoder(path)
    assert (le.encoder.pool_stage, le.encoder.dense_stage) == (3, 3)  # never the untrained layers4
    assert (le.volume_size, le.encoder.input_size, le.encoder.mean) == (64, 64, None)
    for k, v in le.encoder.net.state_dict().items():
        assert k.startswith("out.") or torch.equal(v, net.state_dict()[k]), k  # the head is never read
    (tmp_path / "d").mkdir()
    dead = _fake_export(tmp_path / "d", net, spec, "x", dict.fromkeys(spec.parts, False), {})
    with pytest.raises(CheckpointError, match="no dense features"):
        load_encoder(dead)
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="neither an asa3d pretraining checkpoint"):
        load_encoder(bare)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_encoder(tmp_path / "missing.pt")


def test_adam_checkpoint_and_its_export_give_the_same_encoder(tmp_path: Path) -> None:
    from asa3d.config import from_dict, read_yaml, to_dict
    from asa3d.config_sections import PretrainConfig
    from asa3d.engine.checkpoint import FORMAT
    from asa3d.eve.load import load_encoder
    from asa3d.export import export_checkpoint
    from asa3d.methods.base import build_method

    cfg = from_dict(PretrainConfig, read_yaml("pretrain/adam2d_tiny.yaml"))
    torch.manual_seed(0)
    m = build_method(cfg.method, cfg.model)
    ck = {"format": FORMAT, "method": "adam", "config": to_dict(cfg), "backbone": m.backbone_spec().to_dict(),
          "preprocessing": cfg.data.preprocess.contract(), "transfer_parts": m.transfer_parts(),
          "state": {"method": m.state_dict()}, "progress": {}}  # fmt: skip
    torch.save(ck, tmp_path / "last.pt")
    export_checkpoint(tmp_path / "last.pt", tmp_path / "a.safetensors")
    a, b = load_encoder(tmp_path / "last.pt").encoder, load_encoder(tmp_path / "a.safetensors").encoder
    assert (a.kind, a.spatial_dims, a.input_size, a.mean, a.std) == ("resnet", 2, 32, (0.449,), (0.226,))
    assert (b.input_size, b.mean, b.std) == (a.input_size, a.mean, a.std)  # from the sidecar's method_config
    img = _image((64, 64))
    ea, eb = crop_embeddings(a, img, [[20.0, 30.0]], 16), crop_embeddings(b, img, [[20.0, 30.0]], 16)
    assert torch.allclose(ea, eb)
    with torch.no_grad():  # the encoder as the method trains it: normalised input, pooled layer4
        crop = crop_images(img, [[20.0, 30.0]], 16, 32)
        ref = m.student.encoder.eval()(m._normalise(crop))
    assert torch.allclose(ea, ref, atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_augmented_copy_moves_landmarks_with_the_image(dims: int) -> None:
    from asa3d.eve.inputs import EveInput, augmented_copy

    shape = (48, 40) if dims == 2 else (32, 28, 24)
    p = np.array([14.0, 27.0] if dims == 2 else [10.0, 19.0, 15.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    blob = np.exp(-((grid - p) ** 2).sum(-1) / (2 * 1.5**2)).astype(np.float32)
    inp = EveInput("A", Path("a"), torch.from_numpy(blob)[None], np.ones(dims), "px", {"x": p})
    cp = augmented_copy(inp, degrees=10, zoom=0.85, seed=3)
    img = cp.image[0].numpy()
    centroid = (grid * img[..., None]).reshape(-1, dims).sum(0) / img.sum()
    assert np.allclose(centroid, cp.landmarks["x"], atol=0.25), (centroid, cp.landmarks["x"])
    assert not np.allclose(cp.landmarks["x"], p, atol=1.0)  # it did move
    assert np.allclose(cp.from_original(p)[0], cp.landmarks["x"]) and np.allclose(cp.pixel_size, 0.85)


def _texture_image(
    seed: int = 0, shift: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Four distinct textures (stripes of two directions, checks, dots) on a flat grey field."""
    n = 64
    r, c = np.mgrid[:n, :n].astype(np.float32)
    img = np.full((n, n), 0.5, np.float32)
    tex = {
        "stripes": 0.5 + 0.4 * np.sin(r * 1.2),
        "bands": 0.5 + 0.4 * np.sin(c * 0.7),
        "checks": 0.5 + 0.4 * np.sign(np.sin(r * 0.9) * np.sin(c * 0.9)),
        "dots": 0.5 + 0.4 * ((r % 5 < 2) & (c % 5 < 2)),
    }
    corners = {"stripes": (6, 6), "bands": (6, 38), "checks": (38, 6), "dots": (38, 38)}
    lms = {}
    for k, (y, x) in corners.items():
        y, x = y + shift[0], x + shift[1]
        img[y : y + 20, x : x + 20] = tex[k][y : y + 20, x : x + 20]
        lms[k] = np.array([y + 9.5, x + 9.5])
    return torch.from_numpy(img)[None], lms


class _SpectrumEncoder(EveEncoder):
    """An oracle embedding that tells textures apart (the magnitude spectrum of the mean-removed
    crop): tests the search and the scores, not a network (a random ResNet's pooled features do not
    separate these textures: their cosines are all 0.93-0.997)."""

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.fft.fft2(x - x.mean((-2, -1), keepdim=True)).abs().flatten(1)


def test_localisation_finds_distinct_textures_and_scores_them() -> None:
    from asa3d.eve.inputs import EveInput
    from asa3d.eve.localise import localisation_scores, localise

    enc = _SpectrumEncoder(_net(2), "resnet", 2, input_size=32)
    ia, la = _texture_image()
    ib, lb = _texture_image(shift=(3, -4))
    a = EveInput("A", Path("a"), ia, np.ones(2), "px", la)
    b = EveInput("B", Path("b"), ib, np.ones(2), "px", lb)
    loc = localise(enc, a, b, size=16, grid=16)
    # every texture found: a 16 px crop is pure texture within +-2 px of its square's centre, and the
    # spectrum cannot tell those apart; anywhere else in B the error would be >= 14 px
    assert loc.names == list(la) and (loc.error_px < 4.5).all(), loc.error_px
    s = localisation_scores([loc], [1.0, 5.0])
    assert (
        s["n"] == 4
        and s["hit_rate"]["5px"] == 1.0
        and s["median_error_px"] == pytest.approx(np.median(loc.error_px))
    )
    assert s["per_landmark"]["dots"] == pytest.approx(loc.error[3])


def test_scale_consistency_by_hand() -> None:
    from asa3d.eve.localise import scale_consistency

    # two images x two landmarks x scales (small, large); vectors chosen so every cosine is known
    e = {(0, 0, 0): [1, 0], (0, 0, 1): [1, 0], (0, 1, 0): [0, 1], (0, 1, 1): [1, 1],
         (1, 0, 0): [1, 1], (1, 0, 1): [1, 0], (1, 1, 0): [1, 0], (1, 1, 1): [0, 1]}  # fmt: skip
    keys = list(e)
    le = LandmarkEmbeddings(
        np.array([e[k] for k in keys], np.float32), np.array([k[1] for k in keys]),
        np.array([k[2] for k in keys]), np.array([k[0] for k in keys]), ["p", "q"], [8.0, 16.0],
    )  # fmt: skip
    s = scale_consistency(le, 0, 1)
    r = 1 / np.sqrt(2)
    # (image, landmark): (cos to own large crop, cosines to the small patches of the other landmark)
    cases = [(1.0, [0.0, 1.0]), (r, [0.0, r]), (r, [r, r]), (0.0, [1.0, r])]
    margins = [p - np.mean(n) for p, n in cases]
    aucs = [np.mean([p > x for x in n]) for p, n in cases]
    assert (
        s["n"] == 4
        and s["margin"] == pytest.approx(np.mean(margins))
        and s["auc"] == pytest.approx(np.mean(aucs))
    )
    assert s["auc"] == pytest.approx(0.25) and s["top1"] == 0.0


def test_matching_centres_features_and_skips_flat_cells() -> None:
    from asa3d.eve.correspondence import display_to_voxel, informative_cells

    g = torch.Generator().manual_seed(1)
    fa = torch.randn(8, 4, 4, generator=g)
    fb = torch.roll(fa, 1, dims=2) + 0.3 * torch.randn(8, 4, 4, generator=g)
    offset = torch.full((8, 1, 1), 50.0)  # a common component: every raw cosine is near 1
    raw = match_features(fa + offset, fb + offset, (32, 32), (32, 32), top_k=16)
    cen = match_features(fa + offset, fb + offset, (32, 32), (32, 32), top_k=16, centre=True)
    assert raw.similarity.min() > 0.999 and cen.similarity.min() < 0.99  # centring restores the spread
    assert np.allclose(np.mod(cen.points_b - cen.points_a, 32), [0.0, 8.0])  # and finds the shift
    mu = torch.cat([(fa + offset).flatten(1), (fb + offset).flatten(1)], 1).mean(1)
    ia = int(cen.points_a[0, 0] // 8) * 4 + int(cen.points_a[0, 1] // 8)
    ib = int(cen.points_b[0, 0] // 8) * 4 + int(cen.points_b[0, 1] // 8)
    hand = F.cosine_similarity(fa.flatten(1)[:, ia] + 50 - mu, fb.flatten(1)[:, ib] + 50 - mu, dim=0)
    assert cen.similarity[0] == pytest.approx(float(hand), abs=1e-5)
    valid = np.ones(16, bool)
    valid[:4] = False  # the first row of A may not match
    m = match_features(fa, fb, (32, 32), (32, 32), top_k=16, valid_a=valid)
    assert len(m.similarity) == 12 and (m.points_a[:, 0] > 4).all()
    img = np.zeros((32, 32), np.float32)
    img[:, 16:] = np.random.default_rng(0).random((32, 16))
    cells = informative_cells(img, (4, 4), (8.0, 8.0)).reshape(4, 4)
    assert not cells[:, :2].any() and cells[:, 2:].all()  # background left out, texture kept
    vol = np.zeros((6, 7, 5))
    vol[4, 2, 3] = 1
    for view, c in (("axial", (0, 0, 3)), ("coronal", (0, 2, 0)), ("sagittal", (4, 0, 0))):
        rc = np.argwhere(oriented_slice(vol, view, c) == 1)
        assert np.allclose(display_to_voxel(view, vol.shape, c, rc), [[4, 2, 3]]), view
