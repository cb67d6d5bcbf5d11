"""A method with state (2D MONAI ResNet with BatchNorm, a key queue) under torchrun with 2 gloo
ranks: declared buffer policies keep the ranks equal; a wrong declaration is named. Its export
loads into the plain MONAI ResNet with nothing missing (exact resume after SIGKILL:
test_engine_resume_kill.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from asa3d.engine.distributed import DistEnv
from asa3d.engine.trainer import Trainer
from asa3d.methods.dist_context import DistContext, resolve_buffer_policies
from engine_toy_resnet import RESNET, ToyImages, resnet_config

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "engine_toy_resnet.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not TORCHRUN.exists():
        pytest.fail(f"torchrun not found beside {sys.executable}")
    env = dict(os.environ, ASA3D_TEST_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    return subprocess.run(
        [*cmd, str(SCRIPT), "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_policies_resolve_by_longest_prefix_and_refuse_typos() -> None:
    names = ["student.bn1.running_mean", "queue", "queue_ptr"]
    got = resolve_buffer_policies(names, {"queue": "gathered", "queue_ptr": "local"})
    assert got == {"student.bn1.running_mean": "broadcast", "queue": "gathered", "queue_ptr": "local"}
    with pytest.raises(ValueError, match="choose one of"):
        resolve_buffer_policies(names, {"queue": "replicated"})
    with pytest.raises(ValueError, match="matches no buffer"):
        resolve_buffer_policies(names, {"qeue": "gathered"})
    x = torch.arange(6.0).reshape(3, 2)
    assert DistContext().all_gather(x) is x  # one process: identity


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """The toy trained in process: 12 images at batch 4, 2 rounds (the first at train.lr; a
    one-round run trains at LR 0). Returns the trainer and the student's initial state."""
    out = tmp_path_factory.mktemp("resnet")
    t = Trainer(resnet_config(), out, DistEnv(), dataset_factory=lambda p, s: ToyImages(12))
    initial = {k: v.detach().clone() for k, v in t.method.state_dict().items()}
    t.fit(resume=False)
    return t, initial


def test_resnet_toy_runs_in_process_with_its_spec(resnet_run: tuple[Trainer, dict]) -> None:
    t, initial = resnet_run
    assert t.backbone.spatial_dims == 2 and t.buffer_policies["queue"] == "gathered"
    assert t.buffer_policies["student.bn1.running_mean"] == "broadcast"
    # 2 rounds x 3 steps x 4 keys enqueued in a queue of 16
    assert int(t.method.queue_ptr) == (2 * 3 * 4) % 16 and not torch.equal(t.method.queue, initial["queue"])
    ck = torch.load(t.run_dir / "last.pt", weights_only=True)
    assert ck["backbone"]["class"] == "monai.networks.nets.ResNet" and ck["backbone"]["spatial_dims"] == 2
    assert ck["transfer_parts"] == {
        "stem": True,
        "layer1": True,
        "layer2": True,
        "layer3": True,
        "layer4": True,
    }
    assert ck["backbone"]["kwargs"] == {**RESNET, "conv1_t_stride": 1}  # MONAI's default, recorded


# what a user without asa3d runs: the sidecar's class and kwargs, safetensors, strict=True
PLAIN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from monai.networks.nets import ResNet
    from safetensors.torch import load_file

    weights, out = sys.argv[1], sys.argv[2]
    meta = json.load(open(weights + ".json"))
    assert meta["architecture"]["class"] == "monai.networks.nets.ResNet", meta["architecture"]
    net = ResNet(**meta["architecture"]["kwargs"])
    res = net.load_state_dict(load_file(weights), strict=True)
    torch.save(net.state_dict(), out)
    print(json.dumps({"missing": res.missing_keys, "unexpected": res.unexpected_keys,
                      "asa3d_imported": any(m.split(".")[0] == "asa3d" for m in sys.modules)}))
    """
)


# slow: a clean interpreter importing torch and MONAI (about 10 s of a loaded 2-core machine)
@pytest.mark.slow
def test_resnet_toy_export_loads_into_the_plain_monai_resnet(
    resnet_run: tuple[Trainer, dict], tmp_path: Path
) -> None:
    from asa3d.export import export_checkpoint

    t, initial = resnet_run
    trained = {k: v.detach().clone() for k, v in t.method.student.state_dict().items()}
    assert not torch.equal(trained["conv1.weight"], initial["student.conv1.weight"])
    assert not torch.equal(trained["fc.weight"], initial["student.fc.weight"])
    weights = tmp_path / "resnet.safetensors"
    export_checkpoint(t.run_dir / "last.pt", weights)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a clean interpreter
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(weights), str(tmp_path / "loaded.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"missing": [], "unexpected": [], "asa3d_imported": False}
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded.keys() == trained.keys()
    for k, v in trained.items():  # the trained backbone, BatchNorm statistics included, bit for bit
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert not torch.equal(loaded["bn1.running_mean"], torch.zeros(4))  # statistics really trained
    # fc is the toy's projector (the spec's head): the export carries MONAI's fresh initialisation
    assert loaded["fc.weight"].shape == trained["fc.weight"].shape
    assert not torch.equal(loaded["fc.weight"], trained["fc.weight"])


@pytest.mark.slow
def test_two_ranks_agree_on_parameters_and_buffers(tmp_path: Path) -> None:
    run = _torchrun(tmp_path / "run", "--dump", str(tmp_path / "state"))
    assert run.returncode == 0, run.stderr[-3000:]
    r0 = torch.load(f"{tmp_path / 'state'}.rank0", weights_only=True)
    r1 = torch.load(f"{tmp_path / 'state'}.rank1", weights_only=True)
    assert "queue" in r0 and "student.bn1.running_mean" in r0
    for k in r0:  # parameters AND buffers: BatchNorm statistics broadcast, queue gathered
        assert torch.equal(r0[k], r1[k]), k
    # the queue holds keys of both ranks: 2 steps x 4 images (global batch) per round, 2 rounds
    assert int(r0["queue_ptr"]) == 16 % 16 and not torch.allclose(
        r0["student.bn1.running_mean"], torch.zeros(4)
    )


@pytest.mark.slow
def test_rank_dependent_buffer_declared_gathered_is_named(tmp_path: Path) -> None:
    run = _torchrun(tmp_path / "run", "method.gather_keys=false")
    assert run.returncode != 0
    assert "ranks hold different values of queue (buffer (policy 'gathered'))" in run.stderr, run.stderr[
        -3000:
    ]
