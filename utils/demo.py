"""``python main.py --demo``: train a small model on the built-in synthetic data, on the CPU.

The demo fills in every setting the user left at its default (flags given on the command line,
such as ``--head arcface`` or ``--epochs 3``, are kept), generates the demo data if absent, and
after training prints, besides the accuracy table, the paper's mechanism at toy scale: the Spearman
correlation between the feature norm and the generator's recorded image quality on held-out images,
and the error-versus-reject pAUC (:mod:`utils.quality`) on the held-out pairs of the trained
network's norm and quality indicator, an untrained network's norm, the image baseline and the
generator's recorded quality (the oracle).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from prettytable import PrettyTable
import torch
from torch.utils.data import DataLoader

from utils.demo_data import QUALITY_FILE, ensure_demo_data, read_quality_table

logger = logging.getLogger(__name__)

DEMO_PAIRS_PER_SET = 200
# the held-out pairs of the five sets pooled hold 500 impostor pairs: FMR 1e-3 cannot be measured
# on them, so the demo's error-versus-reject curves fix the threshold at FMR 1e-2 and 1e-1
DEMO_FMRS = (1e-2, 1e-1)

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


@torch.no_grad()
def untrained_norms(args, set_names: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Flip-fused norms of the held-out pair images under a freshly initialised backbone of the
    demo's architecture: the baseline that shows how much of the norm-quality relation exists
    before any training. Returns ``(norms, global image indices)``."""
    import net
    from data import ValidationPairDataset
    from utils.features import embed_batch

    torch.manual_seed(args.seed)
    model = net.build_model(args.arch).eval()
    dataset = ValidationPairDataset(Path(args.data_root) / args.val_data_path, set_names)
    norms, index = [], []
    for images, _, _, image_index in DataLoader(dataset, batch_size=128, num_workers=0):
        _, n = embed_batch(model, images, use_flip=True, fusion_method="pre_norm_vector_add")
        norms.append(n.numpy())
        index.append(image_index.numpy())
    return np.concatenate(norms), np.concatenate(index)


def recorded_quality(image_index: np.ndarray, set_names: List[str], quality_rows: List[dict]) -> np.ndarray:
    """The generator's ``quality_score`` of each held-out image, by global image index over the
    concatenated pair sets (in ``set_names`` order)."""
    quality_of: Dict[tuple, float] = {(r["split"], r["index"]): r["quality_score"] for r in quality_rows}
    counts = [sum(1 for r in quality_rows if r["split"] == name) for name in set_names]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = np.empty(len(image_index), dtype=np.float64)
    for i, idx in enumerate(np.asarray(image_index).reshape(-1)):
        k = int(np.searchsorted(offsets, idx, side="right") - 1)
        out[i] = quality_of[(set_names[k], int(idx - offsets[k]))]
    return out


@torch.no_grad()
def held_out_embeddings(model, args, set_names: List[str]) -> Dict[str, np.ndarray]:
    """Flip-fused features, per-view norms and the image baseline of the held-out pair images, in
    global image order, with the pair labels (``issame``, one per pair)."""
    from data import ValidationPairDataset
    from utils.features import embed_batch_views
    from utils.quality import laplacian_variance

    model.eval()
    device = next(model.parameters()).device
    dataset = ValidationPairDataset(Path(args.data_root) / args.val_data_path, set_names)
    feats, views, sharp, index = [], [], [], []
    for images, _, _, image_index in DataLoader(dataset, batch_size=128, num_workers=0):
        f, _, v = embed_batch_views(model, images.to(device), use_flip=True, fusion_method="pre_norm_vector_add")
        feats.append(f.cpu().numpy())
        views.append(v.cpu().numpy())
        sharp.append(laplacian_variance(images).numpy())
        index.append(image_index.numpy())
    index = np.concatenate(index)
    if not np.array_equal(index, np.arange(len(dataset))):
        raise AssertionError("held-out images out of order")
    return {"features": np.concatenate(feats), "view_norms": np.concatenate(views),
            "laplacian": np.concatenate(sharp), "image_index": index,
            "issame": np.concatenate([dataset.issame(k) for k in range(len(set_names))])}


def quality_evrc_report(args, module, names: List[str], quality_rows: List[dict]):
    """Error-versus-reject curves on the pooled held-out pairs (threshold and scores of the trained
    network): ``{"held-out pairs": {measure: {"FMR=..": RejectCurve}}}``."""
    import net
    from utils.quality import NormStatistics, image_norm
    from utils.quality_report import INDICATOR, LAPLACIAN, pair_list_report

    trained = held_out_embeddings(module.model, args, names)
    torch.manual_seed(args.seed)
    untrained = held_out_embeddings(net.build_model(args.arch), args, names)
    measures = {"trained norm": image_norm(trained["view_norms"])}
    head = getattr(module, "head", None)
    if hasattr(head, "batch_mean") and hasattr(head, "batch_std") and hasattr(head, "h"):
        stats = NormStatistics(float(head.batch_mean.reshape(-1)[0]), float(head.batch_std.reshape(-1)[0]),
                               float(head.h))
        measures[f"trained {INDICATOR}"] = stats.indicator(measures["trained norm"])
    measures["untrained norm"] = image_norm(untrained["view_norms"])
    measures[LAPLACIAN] = trained["laplacian"]
    measures["oracle"] = recorded_quality(trained["image_index"], names, quality_rows)
    return {"held-out pairs": pair_list_report(trained["features"], trained["issame"], measures, fmrs=DEMO_FMRS)}


def report_demo(args, module) -> str:
    """The norm-vs-quality table of the demo (trained model and untrained baseline), as text."""
    out = module.last_embeddings or {}
    if not out:
        return "demo: no held-out embeddings to analyse"
    rows = read_quality_table(Path(args.demo_dir) / QUALITY_FILE)
    names = list(module.val_set_names)
    trained = norm_quality_correlation(out["norm"], out["image_index"], names, rows)
    baseline = norm_quality_correlation(*untrained_norms(args, names), names, rows)
    accuracy = f"{100 * module.last_results.get('test_acc', float('nan')):.2f}"
    table = PrettyTable(["network", "mean test acc (%)", "Spearman(norm, quality)", "held-out images"])
    table.add_row([f"{args.arch} trained with {args.head}", accuracy, f"{trained['spearman']:+.3f}",
                   trained["images"]])
    table.add_row([f"{args.arch} untrained (random init)", "-", f"{baseline['spearman']:+.3f}",
                   baseline["images"]])
    logger.info("demo: Spearman(norm, quality) trained %+.3f, untrained %+.3f",
                trained["spearman"], baseline["spearman"])
    from utils.quality_report import format_pauc_table, write_quality_report

    evrc = quality_evrc_report(args, module, names, rows)
    paths = write_quality_report(Path(args.output_dir) / "quality", evrc, stem="demo_quality",
                                 title="demo: held-out pairs, error versus reject")
    return ("\nFeature norm against the generator's recorded image quality on held-out demo images\n"
            "(AdaFace uses the norm as its quality proxy; the untrained row shows how much of the\n"
            "relation the architecture gives before any training):\n"
            f"{table}\n"
            "\nError versus reject on the held-out pairs of the five sets pooled (scores of the trained\n"
            "network, threshold fixed at the FMR on all pairs, the lowest-quality pairs rejected first;\n"
            "pAUC = mean FNMR over the first 20% rejected, lower is better, random = FNMR at 0;\n"
            f"oracle = the generator's recorded quality; curves in {paths['plot']}):\n"
            f"{format_pauc_table(evrc)}\nCompare heads with: python main.py --demo --head arcface")
