"""Label-efficiency subsets: nested, seeded, saved with the results (docs/evaluation.md).

For one seed, the training cases are permuted once with ``numpy.random.default_rng(seed)``;
fraction ``f`` takes the first ``ceil(f * n)`` cases of that permutation (at least 1). So the
5 % subset is inside the 10 % subset, and so on, and the comparison across fractions isolates
the amount of labels from which cases were drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def subset_size(n: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    # round() first so that 0.1 * 240 = 24.000000000000004 does not become 25
    return max(1, min(n, math.ceil(round(fraction * n, 9))))


def nested_subsets(case_ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[float, list[str]]:
    """``{fraction: [case ids]}``; nested across fractions, deterministic per seed.

    The ids are sorted first so the result does not depend on the order the datalist lists them.
    """
    ids = sorted(case_ids)
    if not ids:
        raise ValueError("no training cases to draw label fractions from")
    order = np.random.default_rng(seed).permutation(len(ids))
    perm = [ids[i] for i in order]
    return {float(f): perm[: subset_size(len(ids), f)] for f in sorted(fractions)}


def fraction_tag(fraction: float) -> str:
    """0.05 -> 'f005', 1.0 -> 'f100' (percent, for file and cell names)."""
    return f"f{round(fraction * 100):03d}"


def save_subsets(path: str | Path, subsets: dict[int, dict[float, list[str]]]) -> Path:
    """Write ``{seed: {fraction: ids}}`` as JSON (keys as strings)."""
    from asa3d.atomic import atomic_write_text

    doc = {str(s): {f"{f:g}": ids for f, ids in fr.items()} for s, fr in subsets.items()}
    return atomic_write_text(path, json.dumps(doc, indent=1))
