"""The evaluation grid never silently reuses stale work: its pretrainings, its phantom and its
cells are fingerprinted, a mismatch is refused (``--overwrite`` redoes exactly what differs);
pretraining runs in this process through ``run_pretrain``; a half-finished cell resumes from its
checkpoint; one progress line whose totals leave out work done before."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from asa3d.config import ConfigError
from asa3d.eval.evaluate import InitSpec, run_grid
from asa3d.eval.grid_inputs import StaleWorkError, make_phantom
from test_eval_grid import FakeRunner, grid_cfg

ASA_TINY = "pretrain/asa_tiny.yaml"


def one_cell_cfg(root: Path, inits: list[InitSpec], **grid):  # noqa: ANN201
    g = dict(modes=["finetune"], fractions=[1.0], seeds=[0])
    g.update(grid)
    cfg = grid_cfg(root, inits, **g)
    cfg.grid.plots = cfg.grid.report = False
    return cfg


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Python process is started (git, for the provenance record, may run)."""
    real_run, real_popen = subprocess.run, subprocess.Popen

    def guard(real):  # noqa: ANN001, ANN202
        def call(args, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            argv = [str(x) for x in (args if isinstance(args, list | tuple) else [args])]
            if argv[0] != "git":
                raise AssertionError(f"a subprocess was started: {argv}")
            return real(args, *a, **k)

        return call

    monkeypatch.setattr(subprocess, "run", guard(real_run))
    monkeypatch.setattr(subprocess, "Popen", guard(real_popen))


@pytest.fixture
def fake_pretrain(monkeypatch: pytest.MonkeyPatch) -> list:
    """Stands in for asa3d.engine.trainer.run_pretrain: a checkpoint whose bytes depend on the
    config's learning rate, progress reported through the factory it is given."""
    import asa3d.engine.trainer as trainer

    calls: list = []

    def run(pcfg, out, resume=None, *, progress=None, dataset_factory=None):  # noqa: ANN001, ANN202
        calls.append((pcfg, resume, progress))
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"lr": torch.tensor(pcfg.train.lr)}, out / "ckpt_r0000_i00000003.pt")
        if progress is not None:
            bar = progress(3, 0, "pretrain")
            bar.update(3)
            bar.close()
        return out / "ckpt_r0000_i00000003.pt"

    monkeypatch.setattr(trainer, "run_pretrain", run)
    return calls


def test_pretraining_is_fingerprinted_done_atomically_and_redone_only_with_overwrite(
    phantom_dataset: Path, tmp_path: Path, fake_pretrain: list, no_subprocess: None
) -> None:
    asa = InitSpec("asa", pretrain_config=ASA_TINY, pretrain_overrides=["train.lr=0.01"])
    cfg = one_cell_cfg(phantom_dataset, [InitSpec("scratch"), asa])
    first = FakeRunner()
    run_grid(cfg, tmp_path, runner=first)
    ((pcfg, resume, progress),) = fake_pretrain
    assert pcfg.method["name"] == "asa" and pcfg.train.lr == 0.01 and pcfg.data.root == str(phantom_dataset)
    assert resume is None and callable(progress)  # auto-resume; a stage of the grid's progress line
    done = json.loads((tmp_path / "pretrain" / "asa" / "DONE").read_text())
    assert set(done) == {"fingerprint", "checkpoint", "sha256"}
    res = json.loads((tmp_path / "cells" / "asa__finetune__f100__s0" / "result.json").read_text())
    assert res["init_source"] == str(tmp_path / "pretrain" / "asa" / "ckpt_r0000_i00000003.pt")
    again = FakeRunner()
    run_grid(cfg, tmp_path, runner=again)
    assert len(fake_pretrain) == 1 and again.calls == []  # nothing redone

    cfg.grid.inits[1].pretrain_overrides = ["train.lr=0.02"]
    with pytest.raises(
        StaleWorkError, match=r"pretraining of init 'asa'.*another configuration.*--overwrite"
    ):
        run_grid(cfg, tmp_path, runner=FakeRunner())
    assert len(fake_pretrain) == 1
    redo = FakeRunner()
    run_grid(cfg, tmp_path, runner=redo, overwrite=True)
    assert len(fake_pretrain) == 2 and fake_pretrain[1][0].train.lr == 0.02
    # other weights: the asa cell is redone (its fingerprint holds the init's content), scratch kept
    assert [c[0] for c in redo.calls] == [str(tmp_path / "pretrain" / "asa" / "ckpt_r0000_i00000003.pt")]

    ckpt = tmp_path / "pretrain" / "asa" / "ckpt_r0000_i00000003.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # the recorded checkpoint changed afterwards
    with pytest.raises(StaleWorkError, match="no longer holds the checkpoint it recorded"):
        run_grid(cfg, tmp_path, runner=FakeRunner())
    (tmp_path / "pretrain" / "asa" / "DONE").write_text("ok\n")  # what an older asa3d left:
    (tmp_path / "pretrain" / "asa" / "fingerprint.json").unlink()  # a bare marker, no fingerprint
    with pytest.raises(StaleWorkError, match="records no pretraining fingerprint"):
        run_grid(cfg, tmp_path, runner=FakeRunner())


def test_cells_refuse_results_without_or_with_another_fingerprint(
    phantom_dataset: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"first weights")
    cfg = one_cell_cfg(phantom_dataset, [InitSpec("scratch"), InitSpec("w", source=str(weights))])
    out = tmp_path / "grid"
    run_grid(cfg, out, runner=FakeRunner())
    res_path = out / "cells" / "scratch__finetune__f100__s0" / "result.json"
    doc = json.loads(res_path.read_text())
    res_path.write_text(json.dumps({k: v for k, v in doc.items() if k != "config_sha"}))
    with pytest.raises(StaleWorkError, match="records no configuration fingerprint.*--overwrite"):
        run_grid(cfg, out, runner=FakeRunner())
    redo = FakeRunner()
    run_grid(cfg, out, runner=redo, overwrite=True)
    assert [c[0] for c in redo.calls] == ["scratch"]  # only the cell without a fingerprint
    assert json.loads(res_path.read_text())["config_sha"] == doc["config_sha"]
    weights.write_bytes(b"other weights")  # same path, other content
    with pytest.raises(StaleWorkError, match=r"w__finetune__f100__s0: this grid cell was run with another"):
        run_grid(cfg, out, runner=FakeRunner())


def test_phantom_spec_is_recorded_and_a_changed_spec_refused(tmp_path: Path) -> None:
    spec = {"n": 2, "n_validation": 1, "shape": [48, 48, 40], "spacing": [8.0, 8.0, 8.0], "seed": 0}
    ds = make_phantom(tmp_path, spec)
    assert json.loads((tmp_path / "phantom" / "spec.json").read_text()) == spec
    mtime = ds.stat().st_mtime_ns
    assert make_phantom(tmp_path, dict(spec)) == ds and ds.stat().st_mtime_ns == mtime  # reused
    bigger = {**spec, "n": 3}
    with pytest.raises(StaleWorkError, match=r"grid.phantom=.*'n': 2.*--overwrite"):
        make_phantom(tmp_path, bigger)
    make_phantom(tmp_path, bigger, overwrite=True)
    assert len(json.loads(ds.read_text())["training"]) == 2  # 3 cases, 1 held out
    (tmp_path / "phantom" / "spec.json").unlink()  # written by an older asa3d: unknown spec
    with pytest.raises(StaleWorkError, match="before its spec was recorded"):
        make_phantom(tmp_path, bigger)


def test_one_progress_line_counts_only_this_runs_work(
    phantom_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asa3d.eval.evaluate as ev
    from asa3d.progress import SharedLine

    stages: list[tuple[str, int | None]] = []
    ends: list[tuple[int, int]] = []

    class Recording(SharedLine):
        def stage(self, desc: str, total: int | None = None) -> None:
            stages.append((desc, total))
            super().stage(desc, total)

        def close(self) -> None:
            ends.append((self._bar.n, self._bar.total))
            super().close()

    import io

    import asa3d.console

    # the line as a terminal draws it (off a terminal tqdm is disabled and counts nothing)
    monkeypatch.setattr(asa3d.console, "progress_kwargs", lambda enabled=True: {"file": io.StringIO()})
    monkeypatch.setattr(ev, "SharedLine", Recording)
    cfg = grid_cfg(phantom_dataset, [InitSpec("scratch")], modes=["finetune", "probe"], fractions=[1.0])
    cfg.grid.plots = cfg.grid.report = False
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, tmp_path, runner=FakeRunner(crash_at=3))
    stages.clear()
    run_grid(cfg, tmp_path, runner=FakeRunner())
    # 4 cells of 2 iterations, 3 finished before: the stage is the last cell's 2 iterations
    assert stages == [("grid: 3/4 cells", 2)] and ends[-1] == (2, 2)

    line = SharedLine(enabled=True)
    line.stage("cells", total=10)
    with line.loop("a", expected=6) as make:
        bar = make(6, 2, "finetune")  # a cell resumed at iteration 2 of 6
        bar.update(4)
        bar.set_postfix(loss="0.5")
    with line.loop("b", expected=4):  # a runner that reports nothing: topped up at its end
        pass
    assert (line._bar.n, line._bar.total) == (8, 8)
    line.close()


def test_probe_of_untrained_parts_is_refused_before_any_cell_and_shown(
    phantom_dataset: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from asa3d.config_sections import ModelConfig
    from asa3d.models.backbones import default_spec

    spec = default_spec(ModelConfig(feature_size=12), 1)
    state = {k: v for k, v in spec.build().state_dict().items() if not spec.is_head_key(k)}
    src = tmp_path / "var_free.safetensors"
    save_file(state, str(src))
    parts = {p: p not in ("layers4", "encoders", "decoder") for p in spec.parts}
    src.with_name(src.name + ".json").write_text(
        json.dumps({"transfer_parts": parts, "backbone": spec.to_dict()})
    )
    runner = FakeRunner()
    cfg = one_cell_cfg(
        phantom_dataset, [InitSpec("scratch"), InitSpec("w", source=str(src))], modes=["finetune", "probe"]
    )
    with pytest.raises(ConfigError, match=r"mode probe would freeze \['layers4'\] of init 'w'"):
        run_grid(cfg, tmp_path / "g1", runner=runner)
    assert runner.calls == []

    def with_transfer(*a, **k):  # noqa: ANN002, ANN003, ANN202
        doc = FakeRunner()(*a, **k)
        doc["transfer"] = {
            "kind": "asa3d-export",
            "expected": 157,
            "expected_matched": 157,
            "untrained_parts": ["decoder", "encoders", "layers4"],
        }
        return doc

    cfg = one_cell_cfg(phantom_dataset, [InitSpec("scratch"), InitSpec("w", source=str(src))])
    cfg.grid.report = True
    run_grid(cfg, tmp_path / "g2", runner=with_transfer)
    assert (
        "| w | asa3d-export | 157/157 | decoder, encoders, layers4 |"
        in (tmp_path / "g2" / "table.md").read_text()
    )
    page = (tmp_path / "g2" / "report.html").read_text()
    assert "<th>untrained parts</th>" in page and "<td>decoder, encoders, layers4</td>" in page


def test_a_finetune_refuses_to_freeze_what_its_init_never_trained() -> None:
    from asa3d.config_sections import ModelConfig
    from asa3d.eval.finetune import FinetuneConfig, check_untrained_frozen, finetune_spec
    from asa3d.eval.transfer import TransferReport

    cfg = FinetuneConfig(model=ModelConfig(feature_size=12), mode="probe")
    spec = finetune_spec(cfg, 3)
    report = TransferReport(
        "asa.pt", "asa3d-checkpoint", metadata={"transfer_parts": {p: p != "layers4" for p in spec.parts}}
    )
    with pytest.raises(ConfigError, match=r"probe would freeze \['layers4'\].*probe.allow_untrained"):
        check_untrained_frozen(cfg, spec, report)
    cfg.probe.allow_untrained = True
    check_untrained_frozen(cfg, spec, report)
    assert "layers4" in report.warnings[-1]
    cfg.mode, cfg.probe.allow_untrained = "finetune", False  # fine-tuning trains them: no refusal
    check_untrained_frozen(cfg, spec, report)


def test_a_refused_init_names_how_its_recorded_network_differs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from asa3d.config_sections import ModelConfig
    from asa3d.eval.transfer import InitConfig, TransferError, init_model
    from asa3d.models.backbones import default_spec

    src_spec = default_spec(ModelConfig(feature_size=24, drop_path_rate=0.3), 1)
    state = {k: v for k, v in src_spec.build().state_dict().items() if not src_spec.is_head_key(k)}
    save_file(state, str(tmp_path / "fs24.safetensors"))
    (tmp_path / "fs24.safetensors.json").write_text(json.dumps({"backbone": src_spec.to_dict()}))
    target = default_spec(ModelConfig(feature_size=12), 3)
    with pytest.raises(TransferError) as err:
        init_model(
            target.build(),
            InitConfig(source=str(tmp_path / "fs24.safetensors")),
            run_dir=tmp_path,
            spec=target,
        )
    msg = str(err.value)
    assert (
        "feature size 24, expected 12" in msg
        and "pretrained on another network: feature_size 24 vs 12" in msg
    )
    assert "drop" not in msg.split("another network")[1]  # training-only kwargs are not differences
    assert json.loads((tmp_path / "transfer.json").read_text())["spec_differences"] == [
        "feature_size 24 vs 12"
    ]


@pytest.mark.slow  # three short real fine-tunings (4, 2 and 2 iterations) of the smallest SwinUNETR
def test_a_half_finished_cell_resumes_from_its_checkpoint(
    phantom_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asa3d.eval.finetune as ft

    cfg = one_cell_cfg(phantom_dataset, [InitSpec("scratch")], keep_models=True)
    cfg.model.depths, cfg.model.num_heads, cfg.model.window_size = (1, 1, 1, 1), (3, 3, 3, 3), 4
    cfg.train.iterations, cfg.train.ckpt_every, cfg.train.deterministic = 4, 1, True
    cfg.train.progress, cfg.eval.max_cases = False, 1
    run_grid(cfg, tmp_path / "whole")
    real, calls = ft.draw_augment, []

    def killed_at_the_third_step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ft, "draw_augment", killed_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cfg, tmp_path / "cut")
    run = tmp_path / "cut" / "cells" / "scratch__finetune__f100__s0" / "run"
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["progress"]["iteration"] == 2 and ck["backbone"]["name"] == "swinunetr"  # the spec is recorded
    monkeypatch.setattr(ft, "draw_augment", real)
    summary = run_grid(cfg, tmp_path / "cut")
    assert summary["cells_run"] == 1
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [2]
    a = torch.load(
        tmp_path / "whole" / "cells" / "scratch__finetune__f100__s0" / "run" / "model_final.pt",
        weights_only=True,
    )
    b = torch.load(run / "model_final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never cut


@pytest.mark.slow  # a real ASA pretraining (1 iteration per phase) inside the grid
def test_grid_pretrains_in_process_through_run_pretrain(
    phantom_dataset: Path, tmp_path: Path, no_subprocess: None
) -> None:
    from test_peers_grid import SHRINK

    asa = InitSpec("asa", pretrain_config=ASA_TINY, pretrain_overrides=SHRINK)
    cfg = one_cell_cfg(phantom_dataset, [InitSpec("scratch"), asa])
    runner = FakeRunner()
    run_grid(cfg, tmp_path, runner=runner)
    run = tmp_path / "pretrain" / "asa"
    done = json.loads((run / "DONE").read_text())
    ckpt = run / done["checkpoint"]
    assert runner.calls[1][0] == str(ckpt)  # the cell's init is the pretraining's last checkpoint
    prov = json.loads((run / "provenance.json").read_text())  # run_pretrain records it at its end
    assert prov["recorded"] == "at the end of the run" and prov["device"].startswith("cpu")
    stamp = ckpt.stat().st_mtime_ns
    run_grid(cfg, tmp_path, runner=FakeRunner())
    assert ckpt.stat().st_mtime_ns == stamp  # reused, not pretrained again
    assert np.isfinite(
        json.loads((tmp_path / "summary.json").read_text())["groups"][0]["dice"]["avg"]["mean"]
    )
