"""Training recipes: named sets of defaults, applied under a config file and the flags.

    fasthpa train --data ROOT --out RUN                       # --recipe fasthpa (the default)
    fasthpa train --data ROOT --out RUN --recipe reference    # the report's recipe, exactly

Precedence, lowest first: the config tree's own defaults (which are the reference recipe), the
recipe, a ``--config`` file, the flags given. ``config.json`` records the recipe that ran
(``run.recipe``).

- ``reference``: the CS230 report's recipe (../shared/reference/hpa.md): batch 8, Adam lr 1e-3
  constant, weighted BCE, horizontal and vertical flips, fp32, exact thresholds on the dev part.
- ``fasthpa``: fasthpa's best-known recipe per unit of compute, measured on held-out synthetic
  data (benchmarks/recipes.py; the figures are in the README).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {},
    "fasthpa": {
        "run": {
            "batch_size": 32,
            "refit_heads": True,
            "location_features": True,
            "threshold_rule": "auto",
            "lpr_tolerance": 0.3,
        },
        "optim": {"lr": 3e-3, "lr_schedule": "onecycle"},
        "speed": {"amp": "auto"},
    },
}
"""recipe -> {section: {field: value}} over the config tree's defaults"""
DEFAULT_RECIPE = "fasthpa"


def recipe_values(name: str) -> dict[str, dict[str, Any]]:
    """A copy of recipe ``name``'s values (the caller may merge into it)."""
    return {section: dict(values) for section, values in RECIPES[name].items()}


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Nested ``{section: {field: value}}`` dicts merged, later layers winning."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out
