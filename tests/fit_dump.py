"""Shared by the torchrun test scripts: save each rank's final method state after `Trainer.fit`.

The scripts compare these per-rank files (ranks must agree on every parameter and buffer), so the
patch forwards whatever `fit` takes; a signature written out here once broke all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import asa3d.engine.trainer as tr


def _state(trainer: tr.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.method.state_dict().items()}


def dump_state_after_fit(
    dump: str, *, with_init: bool = False, extra: Callable[[], dict[str, Any]] | None = None
) -> None:
    """Patch `Trainer.fit` to write `{dump}.rank{R}`: the final state, or {"init", "final", ...}."""
    orig_fit = tr.Trainer.fit

    def fit_and_dump(self: tr.Trainer, *args: Any, **kwargs: Any) -> Any:
        init = _state(self) if with_init else None
        out = orig_fit(self, *args, **kwargs)
        final = _state(self)
        if init is None and extra is None:
            payload: Any = final
        else:
            payload = {"final": final, **({"init": init} if init is not None else {})}
            payload.update(extra() if extra is not None else {})
        torch.save(payload, f"{dump}.rank{self.env.rank}")
        return out

    tr.Trainer.fit = fit_and_dump  # type: ignore[method-assign]
