"""Every public loader of weights refuses a code-running pickle before its payload runs, with an
error naming the file; and no call to torch.load/pickle.load exists in src/ that this test does
not know of (a new loader must be added to LOADERS below, and so gets this test)."""

from __future__ import annotations

import ast
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from asa3d.engine import checkpoint as ck

SRC = Path(__file__).resolve().parents[1] / "src" / "asa3d"


class _Payload:
    """Unpickling this creates a marker file: the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": ck.FORMAT, "state": {"method": _Payload(marker)}}, path)  # torch.save pickles it
    return path


def _engine_checkpoint(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    bad = _evil_checkpoint(tmp / "last.pt", marker)
    return lambda: ck.load_checkpoint(bad), bad


def _engine_latest_resume(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    bad = _evil_checkpoint(tmp / "ckpt_r0_it000001.pt", marker)
    return lambda: ck.load_checkpoint(ck.latest_checkpoint(tmp) or bad), bad


def _finetune_init_pt(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.eval.transfer import read_source

    bad = tmp / "weights.pt"
    torch.save({"state_dict": {"w": _Payload(marker)}}, bad)
    return lambda: read_source(str(bad)), bad


def _finetune_init_run_dir(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.eval.transfer import read_source

    run = tmp / "run"
    run.mkdir()
    bad = run / "model_final.pt"
    torch.save({"format": "asa3d-finetune-1", "state_dict": _Payload(marker)}, bad)
    return lambda: read_source(str(run)), bad


def _finetune_init_export_pt(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.eval.transfer import read_source

    bad = tmp / "teacher.pt"
    torch.save({"w": _Payload(marker)}, bad)
    (tmp / "teacher.pt.json").write_text("{}")  # an export .pt with its sidecar
    return lambda: read_source(str(bad)), bad


def _predict_model(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.config_sections import ModelConfig
    from asa3d.eval.inference import load_finetuned

    run = tmp / "ft"
    run.mkdir()
    kwargs = ModelConfig(feature_size=12).swinunetr_kwargs(2)
    info = {"model_kwargs": dict(kwargs), "n_classes": 2, "mode": "finetune", "weights": "model_final.pt"}
    (run / "model.json").write_text(json.dumps(info, default=list))
    bad = run / "model_final.pt"
    torch.save({"out.conv.conv.weight": _Payload(marker)}, bad)
    return lambda: load_finetuned(run), bad


def _export_checkpoint(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.export import export_checkpoint

    bad = _evil_checkpoint(tmp / "last.pt", marker)
    return lambda: export_checkpoint(bad, tmp / "out.safetensors"), bad


def _read_export_pt(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    from asa3d.export import read_export

    bad = tmp / "export.pt"
    torch.save({"w": _Payload(marker)}, bad)
    return lambda: read_export(bad), bad


def _bare_pickle(tmp: Path, marker: Path) -> tuple[Callable[[], object], Path]:
    bad = tmp / "raw.pt"  # not a torch zip: the legacy pickle path of torch.load
    bad.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    return lambda: ck.load_checkpoint(bad), bad


LOADERS = {
    "engine.load_checkpoint": _engine_checkpoint,
    "engine.resume_latest": _engine_latest_resume,
    "engine.bare_pickle": _bare_pickle,
    "finetune_init.pt": _finetune_init_pt,
    "finetune_init.run_dir": _finetune_init_run_dir,
    "finetune_init.export_pt": _finetune_init_export_pt,
    "predict.load_finetuned": _predict_model,
    "export.export_checkpoint": _export_checkpoint,
    "export.read_export": _read_export_pt,
}

# every call of torch.load / pickle.load(s) in src/, as (file, enclosing function): the loader
# cases above that reach it. Adding a call site without a case here fails the guard below.
CALL_SITES = {
    ("engine/checkpoint.py", "load_checkpoint"): [
        "engine.load_checkpoint",
        "engine.resume_latest",
        "engine.bare_pickle",
        "export.export_checkpoint",
        "export.read_export",
        "finetune_init.export_pt",
        "finetune_init.pt",
        "finetune_init.run_dir",
        "predict.load_finetuned",
    ],
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", sorted(LOADERS))
def test_loader_refuses_malicious_pickle_and_payload_never_runs(name: str, tmp_path: Path) -> None:
    from asa3d.eval.transfer import TransferError

    marker = tmp_path / "pwned"
    load, bad = LOADERS[name](tmp_path, marker)
    with pytest.raises((ck.CheckpointError, TransferError)) as err:
        load()
    assert not marker.exists(), f"{name}: the pickle's payload ran"
    msg = str(err.value)
    assert bad.name in msg, f"{name}: the error does not name the file: {msg}"
    assert "weights_only=False" not in msg  # never torch's advice to turn the protection off


LOAD_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}


# mutmut (scripts/mutation.py) renames each function f of a mutated file to x_f__mutmut_orig,
# x_f__mutmut_1, ... (methods: xǁClassǁf__mutmut_N): a call site is still f's
_MUTMUT_NAME = re.compile(r"x(?:_|ǁ\w+ǁ)(\w+?)__mutmut_(?:\d+|orig)")


def _source_name(name: str) -> str:
    m = _MUTMUT_NAME.fullmatch(name)
    return m.group(1) if m else name


def _load_calls(path: Path) -> list[str]:
    """Enclosing function of every torch.load(...) / pickle.load(s)(...) call in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[str] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                owner = child.func.value
                if isinstance(owner, ast.Name) and (owner.id, child.func.attr) in LOAD_CALLS:
                    found.append(_source_name(func))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_every_torch_load_call_site_is_covered_by_a_loader_case() -> None:
    sites = {(str(p.relative_to(SRC)), fn) for p in sorted(SRC.rglob("*.py")) for fn in _load_calls(p)}
    unknown = sites - set(CALL_SITES)
    assert not unknown, (
        f"torch.load/pickle.load call sites without a malicious-pickle case: {sorted(unknown)}; "
        "route them through asa3d.engine.checkpoint.load_checkpoint or add a case to LOADERS and CALL_SITES"
    )
    assert sites == set(CALL_SITES), f"stale CALL_SITES entries: {sorted(set(CALL_SITES) - sites)}"
    assert all(case in LOADERS for cases in CALL_SITES.values() for case in cases)


def test_the_guard_sees_a_new_call_site(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef f(p):\n    return torch.load(p, weights_only=True)\nx = 'torch.load('\n")
    assert _load_calls(f) == ["f"]  # strings and docstrings do not count, calls do
    # under mutmut the same call site sits in renamed copies of f; an unrelated name stays itself
    f.write_text(
        "import torch\ndef x_f__mutmut_orig(p):\n    return torch.load(p)\n"
        "class C:\n    def xǁCǁg__mutmut_3(self, p):\n        return torch.load(p)\n"
        "def x_h__mutmut(p):\n    return torch.load(p)\n"
    )
    assert _load_calls(f) == ["f", "g", "x_h__mutmut"]
