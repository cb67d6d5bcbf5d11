"""``asa3d evaluate``: initialisations x {finetune, probe} x label fractions x seeds -> tables,
statistics, plots and an HTML report.

The grid first makes its inputs (``asa3d.eval.grid_inputs``: the phantom when ``data.root`` is
unset, the inits it pretrains in this process through ``run_pretrain``), then runs its cells.
Each cell (init, mode, fraction, seed) fine-tunes one model on the seed's nested label subset and
scores the test split. A cell is fingerprinted (``config_sha``: its whole fine-tuning config, its
training ids, its init's weights by content and the data by content); the fingerprint is written
to ``OUT/cells/<cell>/cell.json`` before the cell starts and into its ``result.json`` (written
atomically) when it ends. A rerun:

- keeps every cell whose ``result.json`` has the current fingerprint;
- resumes a half-finished cell of the current fingerprint from its fine-tuning checkpoint
  (``train.ckpt_every``, SIGTERM);
- refuses a cell, a pretraining or a phantom made with other settings (or recording no
  fingerprint), naming it and ``--overwrite``; with ``overwrite`` exactly those are redone.

Progress: one line for the whole grid (``asa3d.progress.SharedLine``): each pretraining is a stage
of it, then all cells still to run are one stage whose ETA counts only this run's work.

Outputs in OUT: ``subsets.json``, ``per_case.csv`` + ``per_case.json``, ``summary.json``,
``table.md`` (+ ``table_btcv12.md`` for BTCV), ``stats.json`` + ``stats.md``, ``plots/*.png``,
``provenance.json``, ``report.html`` (``asa3d.eval.tables``, ``asa3d.eval.report``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from asa3d import provenance
from asa3d.atomic import atomic_write_json
from asa3d.config import ConfigError, save_config, to_dict
from asa3d.eval.config_sections import EvaluateConfig, GridConfig, InitSpec  # noqa: F401  re-exported
from asa3d.eval.finetune import (
    FinetuneConfig,
    check_input_sizes,
    finetune_spec,
    is_2d,
    load_index,
    run_finetune,
    total_iterations,
)
from asa3d.eval.grid_inputs import fingerprint, make_phantom, resolve_init, stale
from asa3d.eval.metrics import json_safe
from asa3d.eval.probe import frozen_parts
from asa3d.eval.splits import fraction_tag, nested_subsets, save_subsets
from asa3d.eval.tables import aggregate
from asa3d.eval.transfer import InitConfig
from asa3d.progress import BarFactory, SharedLine

log = logging.getLogger(__name__)

CELL_RECORD = "cell.json"  # the fingerprint a cell was started with (before its run folder exists)


def config_sha(
    cell: Any, train_ids: Sequence[str], init_fingerprint: str = "", data_fingerprint: str = ""
) -> str:
    """Fingerprint of what a grid cell computes: its whole fine-tuning config, its training ids,
    and (given) its init's weights and its data by content, in place of their paths. A rerun
    with other settings, other weights under the same path or other data never reuses a result
    made with the old ones."""
    doc = to_dict(cell)
    if init_fingerprint:
        doc["init"] = {**doc["init"], "source": init_fingerprint}
    if data_fingerprint:
        doc["data"] = {**doc["data"], "root": data_fingerprint}
    return fingerprint({"config": doc, "train_ids": list(train_ids)})


def cell_name(init: str, mode: str, fraction: float, seed: int) -> str:
    return f"{init}__{mode}__{fraction_tag(fraction)}__s{seed}"


def _atomic_json(path: Path, doc: Any) -> None:
    atomic_write_json(path, json_safe(doc))


CellRunner = Callable[..., dict[str, Any]]  # (cfg, run_dir, ids, train_index, test_index, *, progress)


def _default_runner(
    cfg: FinetuneConfig,
    run_dir: Path,
    ids: Sequence[str],
    train_index: Any,
    test_index: Any,
    *,
    progress: BarFactory | None = None,
) -> dict[str, Any]:
    return run_finetune(
        cfg, run_dir, train_ids=ids, train_index=train_index, test_index=test_index, progress=progress
    )


@dataclasses.dataclass
class _Cell:
    name: str
    spec: InitSpec
    mode: str
    fraction: float
    seed: int
    cfg: FinetuneConfig
    sha: str
    ids: list[str]
    keep_pred: bool

    def dir(self, out: Path) -> Path:
        return out / "cells" / self.name


def _cell_state(cell: _Cell, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The finished result of ``cell`` (None: it must run). Work recorded with another
    fingerprint, or with none, is refused; with ``overwrite`` it is removed."""
    cdir = cell.dir(out)
    res_path = cdir / "result.json"
    if res_path.exists():
        done = json.loads(res_path.read_text())
        recorded = done.get("config_sha")
        if recorded == cell.sha:
            return done
        why = (
            "records no configuration fingerprint (made by an older asa3d)"
            if recorded is None
            else "was run with another configuration (iterations, lr, data, init weights, ...) "
            "than the one given now"
        )
    elif (cdir / "run").exists():
        rec = {}
        if (cdir / CELL_RECORD).is_file():
            rec = json.loads((cdir / CELL_RECORD).read_text())
        if rec.get("config_sha") == cell.sha:
            return None  # half-finished with these settings: resumes from its checkpoint
        why = "holds a half-finished run of another configuration"
    else:
        return None
    if not overwrite:
        raise stale("this grid cell", cdir, why)
    log.info("cell %s %s: running it again", cell.name, why)
    shutil.rmtree(cdir)
    return None


def _check_probes(cfg: EvaluateConfig, sources: dict[str, str]) -> None:
    """Refuse before any cell runs when a probe would freeze parts an init's pretraining never
    trained (the cell itself would refuse, after the fine-tuning cells of that init ran)."""
    if cfg.probe.allow_untrained:
        return
    modes = [m for m in cfg.grid.modes if m != "finetune"]
    if not modes:
        return
    from asa3d.eval.transfer import read_source

    spec = finetune_spec(cfg, 2)
    for name, source in sources.items():
        if source in ("", "scratch"):
            continue
        init = next(i for i in cfg.grid.inits if i.name == name)
        parts = read_source(source, init.key_map)[2].get("transfer_parts") or {}
        untrained = {p for p, trained in parts.items() if not trained}
        for mode in modes:
            bad = sorted(untrained & set(frozen_parts(spec, mode, cfg.probe.freeze_encoders)))
            if bad:
                raise ConfigError(
                    f"grid: mode {mode} would freeze {bad} of init {name!r} ({source}), which its "
                    "pretraining never trained (random weights): the probe would measure random "
                    "features. Drop the mode, pretrain with the task that trains them, or set "
                    "probe.allow_untrained=true."
                )


def run_grid(
    cfg: EvaluateConfig,
    out_dir: str | Path,
    runner: CellRunner | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the grid, then aggregate. ``runner`` is replaceable for tests;
    ``overwrite`` redoes work made with other settings instead of refusing it."""
    from asa3d.provenance import data_fingerprint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = runner or _default_runner
    g = cfg.grid
    if cfg.eval.split is None:
        raise ConfigError("evaluate needs eval.split (the labelled test section, e.g. validation)")
    check_input_sizes(cfg)  # before the phantom, the caches and any pretraining
    if cfg.data.root is None and g.phantom is not None:
        root = str(make_phantom(out, g.phantom, overwrite))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    save_config(cfg, out / "config.yaml")
    task = cfg.task if is_2d(cfg) else None  # 2D images: labelled per task (asa3d.data.labelled2d)
    train_index = load_index(cfg.data, task=task)
    test_index = load_index(cfg.data, cfg.eval.split, task)
    ids = [c.id for c in train_index.cases]
    subsets = {s: nested_subsets(ids, g.fractions, s) for s in g.seeds}
    save_subsets(out / "subsets.json", subsets)
    data_fp = data_fingerprint(cfg.data.root)

    line = SharedLine(enabled=cfg.train.progress)
    t0 = time.time()
    try:
        sources: dict[str, str] = {}
        init_fps: dict[str, str] = {}
        pretrained = [s for s in g.inits if s.pretrain_config]
        for spec in g.inits:
            if spec.pretrain_config:
                k = pretrained.index(spec) + 1
                line.stage(f"grid: pretrain {spec.name} ({k}/{len(pretrained)})")
                with line.loop(spec.name) as factory:
                    sources[spec.name], init_fps[spec.name] = resolve_init(spec, out, cfg, overwrite, factory)
            else:
                sources[spec.name], init_fps[spec.name] = resolve_init(spec, out, cfg, overwrite)
        _check_probes(cfg, sources)

        cells = []
        for spec in g.inits:
            for mode in g.modes:
                for frac in g.fractions:
                    for seed in g.seeds:
                        cells.append(
                            _make_cell(cfg, spec, mode, frac, seed, subsets, sources, init_fps, data_fp)
                        )
        results: dict[str, dict[str, Any]] = {}
        for cell in cells:  # every stale cell is refused before any work starts
            done = _cell_state(cell, out, overwrite)
            if done is not None:
                results[cell.name] = done
        todo = [c for c in cells if c.name not in results]
        expected = {c.name: total_iterations(c.cfg.train, len(c.ids)) for c in todo}
        line.stage(f"grid: {len(results)}/{len(cells)} cells", total=sum(expected.values()))
        for i, cell in enumerate(todo):
            line.describe(f"grid: {len(results)}/{len(cells)} cells", cell.name)
            log.debug("cell %d/%d %s (%d training cases)", i + 1, len(todo), cell.name, len(cell.ids))
            results[cell.name] = _run_cell(
                cell, out, runner, line, expected[cell.name], train_index, test_index, g.keep_models
            )
        line.describe(f"grid: {len(results)}/{len(cells)} cells")
    finally:
        line.close()
    ran = len(todo)
    log.info("grid: %d cells run, %d reused, %.0f s", ran, len(cells) - ran, time.time() - t0)
    label_names = {int(k): v for k, v in train_index.label_names.items()}
    summary = aggregate([results[c.name] for c in cells], cfg, out, label_names, test_index)
    summary["cells_run"], summary["cells_resumed"] = ran, len(cells) - ran
    _atomic_json(out / "summary.json", summary)
    provenance.record(out)
    if g.report:
        from asa3d.eval.report import build_report

        build_report(out)
    return summary


def _make_cell(
    cfg: EvaluateConfig,
    spec: InitSpec,
    mode: str,
    frac: float,
    seed: int,
    subsets: dict[int, dict[float, list[str]]],
    sources: dict[str, str],
    init_fps: dict[str, str],
    data_fp: str,
) -> _Cell:
    g = cfg.grid
    init = InitConfig(
        source=sources[spec.name],
        key_map=list(spec.key_map),
        expect=spec.expect,
        allow_partial=spec.allow_partial,
    )
    keep_pred = seed == g.seeds[0] and frac == max(g.fractions)
    cell_cfg = dataclasses.replace(
        cfg,
        mode=mode,
        init=init,
        train=dataclasses.replace(cfg.train, seed=seed),
        eval=dataclasses.replace(cfg.eval, save_predictions=keep_pred),
    )
    base = FinetuneConfig(**{f.name: getattr(cell_cfg, f.name) for f in dataclasses.fields(FinetuneConfig)})
    ids = list(subsets[seed][frac])
    return _Cell(
        name=cell_name(spec.name, mode, frac, seed),
        spec=spec,
        mode=mode,
        fraction=frac,
        seed=seed,
        cfg=base,
        sha=config_sha(base, ids, init_fps[spec.name], data_fp),
        ids=ids,
        keep_pred=keep_pred,
    )


def _run_cell(
    cell: _Cell,
    out: Path,
    runner: CellRunner,
    line: SharedLine,
    expected: int,
    train_index: Any,
    test_index: Any,
    keep_models: bool,
) -> dict[str, Any]:
    cdir = cell.dir(out)
    run_dir = cdir / "run"
    _atomic_json(cdir / CELL_RECORD, {"cell": cell.name, "config_sha": cell.sha})  # before the run starts
    with line.loop(cell.name, expected) as factory:
        doc = runner(cell.cfg, run_dir, cell.ids, train_index, test_index, progress=factory)
    if not keep_models:
        for p in run_dir.glob("model_*.pt"):
            p.unlink()
    result = {
        "cell": cell.name,
        "config_sha": cell.sha,
        "init": cell.spec.name,
        "init_source": cell.cfg.init.source,
        "mode": cell.mode,
        "fraction": cell.fraction,
        "seed": cell.seed,
        "train_ids": cell.ids,
        "per_case": doc.get("per_case", []),
        "summary": doc.get("summary", {}),
        "loss_first": doc.get("loss_first"),
        "loss_last": doc.get("loss_last"),
        "seconds": doc.get("seconds"),
        "transfer": doc.get("transfer"),
        "predictions": str(run_dir / "predictions") if (run_dir / "predictions").is_dir() else None,
    }
    _atomic_json(cdir / "result.json", result)
    return json.loads((cdir / "result.json").read_text())
