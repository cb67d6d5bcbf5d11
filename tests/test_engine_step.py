"""The shared optimisation step's post-step hook (the EMA hook): it runs once, after the optimiser
changed the weights, and never for a step that was skipped."""

from __future__ import annotations

import pytest
import torch

from asa3d.engine.distributed import DistEnv
from asa3d.engine.step import optimisation_step


class _InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward (an fp16-style overflow)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return g * float("inf")


def _step(kind: str, scaler_on: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, object]:
    """One step of a linear model; ``kind``: good | nan_loss | inf_grad. Returns the weights the
    hook saw (empty when it was not called), the weights before, and the outcome."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    before = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_on)
    seen: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = lin(x).pow(2).mean()
        if kind == "nan_loss":
            y = y * float("nan")
        if kind == "inf_grad":
            y = _InfGrad.apply(y)
        return {"loss": y}

    def hook() -> dict[str, float]:
        seen.append(lin.weight.detach().clone())
        return {"ema_momentum": 0.99}

    out = optimisation_step(
        [torch.ones(2, 3)],
        forward,
        optimizer=opt,
        scaler=scaler,
        params=list(lin.parameters()),
        precision="fp32",
        env=DistEnv(),
        after_step=hook,
    )
    return seen, before, out


def test_hook_runs_once_after_the_weights_changed() -> None:
    seen, before, out = _step("good")
    assert out.stepped and not out.bad  # type: ignore[attr-defined]
    assert len(seen) == 1 and not torch.equal(seen[0], before)  # it saw the stepped weights
    assert out.after == {"ema_momentum": 0.99}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "scaler_on", "bad"),
    [("nan_loss", False, ["loss"]), ("inf_grad", False, ["grad_norm"]), ("inf_grad", True, [])],
    ids=["non-finite loss", "non-finite gradient", "GradScaler overflow"],
)
def test_hook_is_skipped_with_the_step(kind: str, scaler_on: bool, bad: list[str]) -> None:
    seen, before, out = _step(kind, scaler_on)
    assert seen == [] and out.after == {} and not out.stepped  # type: ignore[attr-defined]
    assert out.bad_terms == bad  # type: ignore[attr-defined]  # the scaler's skip is not a "bad" step


def test_trainer_runs_the_methods_ema_inside_the_step(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The method's ``on_step_end`` is the step's post-step hook: it has run when the step returns,
    and its scalars are logged."""
    import asa3d.engine.trainer as tr
    from engine_toy_method import toy_config, toy_factory

    t = tr.Trainer(toy_config(["train.epochs=1"]), tmp_path, DistEnv(), dataset_factory=toy_factory(4))
    grew: list[int] = []
    real = tr.optimisation_step

    def watched(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        n = len(t.method.ema_calls)  # type: ignore[attr-defined]
        out = real(*args, **kwargs)
        grew.append(len(t.method.ema_calls) - n)  # type: ignore[attr-defined]
        return out

    monkeypatch.setattr(tr, "optimisation_step", watched)
    t.fit(resume=False)
    assert grew == [1, 1, 1, 1]
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert logged.count('"method/ema_momentum"') == 4
