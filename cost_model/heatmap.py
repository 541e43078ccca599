"""The NFN heatmap: layers x module types, coloured by each site's PLoP score.

matplotlib is an optional extra (`pip install matplotlib`); it is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path

from cost_model.plan import Plan
from rewrite.files import staged

INSTALL_HINT = (
    "the NFN heatmap needs matplotlib, an optional extra: pip install matplotlib "
    "(or pip install 'peftc[plot]')"
)


def write_heatmap(plan: Plan, path: str | os.PathLike) -> Path:
    """Draw the plan's site NFN scores as a layers x module types image (PNG, SVG, PDF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    layers, types, cells = plan.heatmap_data()
    if not layers:
        raise ValueError(
            "the plan has no NFN scores by layer to draw; plan with placement strategy plop "
            "(or eva/all with calibration batches) on a model with numbered layers"
        )
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
    chosen = {a.path for a in plan.assignments}
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(types), 1.0 + 0.35 * len(layers)))
    image = ax.imshow(data, aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(types)), types, rotation=40, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"PLoP NFN (lower = adapt first); * = chosen ({plan.strategy})")
    by_cell = {}
    for a in plan.assignments:
        if a.site.layer is not None:
            by_cell[(a.site.layer, a.site.module_type)] = a.path
    for i, layer in enumerate(layers):
        for j, t in enumerate(types):
            if (layer, t) in by_cell and by_cell[(layer, t)] in chosen:
                ax.text(j, i, "*", ha="center", va="center", color="red", fontsize=14)
    fig.colorbar(image, ax=ax, label="NFN")
    fig.tight_layout()
    out = Path(path)
    try:
        with staged(out, make_parents=True) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return out
