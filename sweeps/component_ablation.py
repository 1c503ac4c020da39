"""Component ablation of LongVQ on ListOps (2K): each variant removes or swaps one component.

Not a cartesian grid (one change at a time), so each variant is its own small sweep over seeds.
"""

VARIANTS = {
    "full": {},
    "no-vq": {"vq": False},  # full quadratic attention on un-quantised keys
    "no-gate": {"gate": False},  # no attention / output gates from the SSM branch
    "no-local-bias": {"local_bias": False},
    "ema-memory": {"ssm": "ema"},  # Mega's damped EMA instead of S4D
}

SWEEP = [
    {
        "name": f"component-ablation-{variant}",
        "model": "longvq",
        "preset": "listops-2k",
        "description": f"LongVQ component ablation: {variant}",
        "base": {"codebook_size": 256, **changes},
        "grid": {"seed": [0, 1]},
    }
    for variant, changes in VARIANTS.items()
]
