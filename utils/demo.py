"""``python main.py --demo``: train a small model on the built-in synthetic data, on the CPU.

The demo fills in every setting the user left at its default (flags given on the command line,
such as ``--head arcface`` or ``--epochs 3``, are kept), generates the demo data if absent, and
after training prints, besides the accuracy table, the paper's mechanism at toy scale: the Spearman
correlation between the feature norm and the generator's recorded image quality on held-out images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List

import numpy as np
from prettytable import PrettyTable

from utils.demo_data import QUALITY_FILE, ensure_demo_data, read_quality_table

logger = logging.getLogger(__name__)

DEMO_PAIRS_PER_SET = 200

# settings of the demo run (each applies only where the user kept the flag's default)
DEMO_SETTINGS = {
    "arch": "ir_tiny",
    "gpus": 0,
    "epochs": 8,
    "batch_size": 64,
    "lr": 0.1,
    "lr_milestones": [5, 7],
    "channels_last": True,
    "num_workers": 2,
    "m": 0.4,
    "h": 0.333,
    "use_mxrecord": True,
    "low_res_augmentation_prob": 0.2,
    "crop_augmentation_prob": 0.2,
    "photometric_augmentation_prob": 0.2,
    "prefix": "demo",
}


def apply_demo_settings(args, defaults) -> None:
    """Apply :data:`DEMO_SETTINGS` to every flag of ``args`` still at its default."""
    for key, value in DEMO_SETTINGS.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    args.num_sanity_val_steps = 0
    args.log_every_n_steps = 10


def prepare_demo_data(args) -> dict:
    """Generate the demo data in ``args.demo_dir`` if absent and point the data flags at it."""
    info = ensure_demo_data(args.demo_dir, pairs_per_set=DEMO_PAIRS_PER_SET)
    args.data_root = str(Path(args.demo_dir))
    args.train_data_path = "."
    args.val_data_path = "."
    logger.info("demo: %d training images of %d identities in %s (%s)",
                info["counts"].get("train_images", 0), info["counts"].get("train_identities", 0),
                args.demo_dir, "generated" if info.get("generated") else "reused")
    return info


def norm_quality_correlation(norms: np.ndarray, image_index: np.ndarray, set_names: List[str],
                             quality_rows: List[dict]) -> Dict[str, float]:
    """Spearman correlation of feature norm with recorded quality over held-out pair images.

    ``image_index`` is the global index over the concatenated pair sets (in ``set_names`` order);
    returns ``{"spearman": rho, "p_value": p, "images": n}``.
    """
    from scipy.stats import spearmanr

    quality_of: Dict[tuple, float] = {(r["split"], r["index"]): r["quality_score"] for r in quality_rows}
    counts = {name: sum(1 for r in quality_rows if r["split"] == name) for name in set_names}
    offsets, start = {}, 0
    for name in set_names:
        offsets[name] = start
        start += counts[name]
    xs, ys = [], []
    for norm, idx in zip(np.asarray(norms).reshape(-1), np.asarray(image_index).reshape(-1)):
        for name in set_names:
            if offsets[name] <= idx < offsets[name] + counts[name]:
                xs.append(float(norm))
                ys.append(quality_of[(name, int(idx - offsets[name]))])
                break
    rho, p = spearmanr(xs, ys)
    return {"spearman": float(rho), "p_value": float(p), "images": len(xs)}


def report_demo(args, module) -> Dict[str, float]:
    """Print the norm-vs-quality correlation of the trained demo model; return it."""
    out = module.last_embeddings or {}
    if not out:
        print("demo: no held-out embeddings to analyse")
        return {}
    rows = read_quality_table(Path(args.demo_dir) / QUALITY_FILE)
    stats = norm_quality_correlation(out["norm"], out["image_index"], module.val_set_names, rows)
    table = PrettyTable(["head", "mean val acc (%)", "Spearman(norm, quality)", "held-out images"])
    table.add_row([args.head, f"{100 * module.last_results.get('test_acc', float('nan')):.2f}",
                   f"{stats['spearman']:+.3f}", stats["images"]])
    print("\nFeature norm as a quality proxy on held-out demo images "
          "(the paper's mechanism at toy scale):")
    print(table)
    print("Compare heads with: python main.py --demo --head arcface")
    return stats
