"""Face quality from AdaFace's feature norm, and its measurement by error-versus-reject curves.

**The quality indicator.** The AdaFace head keeps running averages of the mean and standard
deviation of the feature norms seen in training (``head.batch_mean``, ``head.batch_std``, saved in
every checkpoint) and turns each norm ``z`` into ``z_hat = clip(h * (clip(z, 0.001, 100) - mean) /
(std + 1e-3), -1, 1)``, the value that sets the margin (:func:`quality_indicator`, which
``head.AdaFace`` itself calls). With a checkpoint's own statistics any norm lands on the scale the
model was trained with: -1 is a norm ``1/h`` standard deviations (3 for ``h = 0.333``) or more
below the training mean (the lowest quality the margin distinguishes), 0 the training mean, +1
three or more above.

**Error-versus-reject curves** (EVRC, ISO/IEC 29794-1; :func:`error_versus_reject`). The
comparison threshold is fixed once, on all pairs, at a target false-match rate; then the pairs of
lowest quality (a pair's quality is the lower of its two images', :func:`pair_quality`) are
rejected, and the false non-match rate (FNMR) of the genuine pairs that remain is plotted against
the fraction of *all* pairs rejected. A useful quality score makes the curve fall; random rejection
leaves it flat.

Rules, stated once here (and in the README):

* **threshold**: with ``N_imp`` impostor scores and ``k = floor(fmr * N_imp)``, the threshold is the
  ``(k+1)``-th highest impostor score and a comparison matches when its score is strictly above it,
  so the achieved FMR is ``k / N_imp <= fmr`` (when impostor scores are distinct). With fewer than
  ``1 / fmr`` impostors that is the highest impostor score (FMR 0); the result records the achieved
  FMR and the impostor count.
* **rejection and ties**: ``k`` pairs are rejected for every ``k = 0 .. N``, in increasing order of
  quality. Pairs of equal quality are rejected in an order drawn uniformly at random, and the curve
  is the ratio of the *expected* counts: when ``k`` falls inside a group of ``n`` tied pairs of which
  ``m`` are rejected, each pair of the group counts as rejected by ``m / n``. The result is
  deterministic and does not depend on the order of the input.
* **the curve** is the piecewise-linear interpolation of the points ``(k / N, FNMR_k)``.
* **pAUC** is the area under that curve from 0 to ``max_reject`` (0.2) **divided by**
  ``max_reject``: the mean FNMR over the first 20% rejected, in the units of FNMR. Lower is better;
  random rejection gives FNMR(0); ``max_reject`` need not be a multiple of ``1 / N``.
* **random rejection** (:func:`random_rejection`): rejecting pairs uniformly at random leaves the
  expected FNMR at FNMR(0) (ratio of expected counts), so its curve is the flat line at FNMR(0); a
  constant quality score gives exactly that curve too.
* **identification** (:func:`identification_versus_reject`): the items are probes (quality of the
  probe), the error is a mated probe whose best-scoring gallery entry is not a mate (1 - rank-1,
  i.e. FNIR at rank 1 in closed-set), counted over the mated probes that remain.

**Image baseline** (:func:`laplacian_variance`): the variance of the 4-neighbour Laplacian of the
aligned 112x112 crop's grey levels (0..255), a classic sharpness measure needing no model.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from utils.errors import UserError
from utils.image import MEAN, STD

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# what head.AdaFace applies to a norm before normalising it (the published ``safe_norms``) and the
# eps of the published AdaFace head
NORM_CLIP = (0.001, 100.0)
ADAFACE_EPS = 1e-3
DEFAULT_FMRS = (1e-3, 1e-4)
DEFAULT_MAX_REJECT = 0.2

# ITU-R BT.601 luma weights of the network's BGR channels
_BGR_TO_GREY = (0.114, 0.587, 0.299)


class QualityError(UserError, ValueError):
    """A quality report cannot be made from these inputs (named in the message)."""


# ------------------------------------------------------------------------------------------------
# the indicator
# ------------------------------------------------------------------------------------------------
def quality_indicator(norms, batch_mean, batch_std, h: float, eps: float = ADAFACE_EPS):
    """AdaFace's normalised norm ``clip(h * (clip(z, 0.001, 100) - mean) / (std + eps), -1, 1)``.

    Works on numpy arrays (and lists) and on torch tensors alike, with the operations in the order
    of the published head; ``head.AdaFace.margin_scaler`` calls it with its running statistics.
    """
    if not isinstance(norms, torch.Tensor):
        norms = np.asarray(norms, dtype=np.float64)
    safe = norms.clip(*NORM_CLIP)
    scaler = (safe - batch_mean) / (batch_std + eps)
    return (scaler * h).clip(-1, 1)


@dataclass(frozen=True)
class NormStatistics:
    """AdaFace's running norm statistics and ``h`` of one checkpoint."""

    batch_mean: float
    batch_std: float
    h: float
    source: str = ""

    def indicator(self, norms) -> np.ndarray:
        return np.asarray(quality_indicator(norms, self.batch_mean, self.batch_std, self.h), dtype=np.float64)

    def as_dict(self) -> Dict[str, float]:
        return {"batch_mean": self.batch_mean, "batch_std": self.batch_std, "h": self.h}


def _hparam(hparams, key: str):
    if isinstance(hparams, Mapping):
        return hparams.get(key)
    return getattr(hparams, key, None)


def norm_statistics_of(checkpoint: Mapping, source: str = "<dict>") -> NormStatistics:
    """The AdaFace statistics held by a loaded Lightning checkpoint (``state_dict`` entries
    ``head.batch_mean``, ``head.batch_std``; ``h`` from ``hyper_parameters``, the published default
    0.333 when the file does not record it). Raises :class:`QualityError` for a checkpoint without
    them (another head, or a bare backbone)."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else {}
    mean, std = state.get("head.batch_mean"), state.get("head.batch_std")
    if mean is None or std is None:
        head = _hparam(checkpoint.get("hyper_parameters"), "head") if isinstance(checkpoint, Mapping) else None
        raise QualityError(f"{source}: holds no AdaFace norm statistics (head.batch_mean / head.batch_std"
                           f"{'; it was trained with --head ' + str(head) if head else ''}); the quality "
                           f"indicator needs a checkpoint trained with the AdaFace head (the raw norm "
                           f"is still available)")
    h = _hparam(checkpoint.get("hyper_parameters"), "h")
    if h is None:
        logger.info("%s: no h in its hyper_parameters; using the published default 0.333", source)
        h = 0.333
    mean_v, std_v = float(torch.as_tensor(mean).reshape(-1)[0]), float(torch.as_tensor(std).reshape(-1)[0])
    if not (math.isfinite(mean_v) and math.isfinite(std_v)):
        raise QualityError(f"{source}: its AdaFace norm statistics are not finite (batch_mean {mean_v}, "
                           f"batch_std {std_v}); the quality indicator cannot be computed")
    return NormStatistics(mean_v, std_v, float(h), str(source))


def read_norm_statistics(path: PathLike, trust: bool = False) -> NormStatistics:
    """:func:`norm_statistics_of` the checkpoint at ``path``, read with the one safe loader
    (:func:`utils.checkpoint.read_checkpoint`, memory-mapped: the weights are not read)."""
    from utils.checkpoint import read_checkpoint

    return norm_statistics_of(read_checkpoint(path, trust=trust, mmap=True), str(path))


def image_norm(view_norms: np.ndarray) -> np.ndarray:
    """One norm per image on the training scale: the mean of the norms of its views (the image and,
    with the flip test, its mirror), shape ``(N,)``. (The flip-fused norm of ``pre_norm_vector_add``,
    ``|e1 n1 + e2 n2|``, is nearly twice a single norm and is not on that scale.)"""
    view_norms = np.asarray(view_norms, dtype=np.float64)
    return view_norms.reshape(len(view_norms), -1).mean(axis=1)


# ------------------------------------------------------------------------------------------------
# the image baseline
# ------------------------------------------------------------------------------------------------
def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Sharpness of each image of a network-input batch ``(B, 3, H, W)`` (BGR, ``[-1, 1]``): the
    (population) variance over the interior pixels of ``g[i-1,j] + g[i+1,j] + g[i,j-1] + g[i,j+1] -
    4 g[i,j]``, ``g`` the grey level in 0..255 (BT.601 weights). Returns ``(B,)`` float64 on the CPU."""
    x = images.detach().to(torch.float64)
    pixels = (x * STD + MEAN) * 255.0                 # the inverse of utils.image's normalisation
    weights = torch.tensor(_BGR_TO_GREY, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    g = (pixels * weights).sum(dim=1)
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    return lap.flatten(1).var(dim=1, unbiased=False).cpu()


# ------------------------------------------------------------------------------------------------
# error versus reject
# ------------------------------------------------------------------------------------------------
def pair_quality(quality_1, quality_2) -> np.ndarray:
    """A pair's quality: the lower of its two images' (or templates')."""
    return np.minimum(np.asarray(quality_1, dtype=np.float64), np.asarray(quality_2, dtype=np.float64))


@dataclass
class RejectCurve:
    """One error-versus-reject curve: ``error[k]`` after rejecting ``reject[k]`` of the items."""

    reject: np.ndarray            # fractions k / N, k = 0 .. K
    error: np.ndarray             # FNMR (or 1 - rank-1) of the remaining counted items
    pauc: float                   # mean error over [0, max_reject]
    max_reject: float
    items: int                    # pairs (or probes)
    counted: int                  # genuine pairs (or mated probes)
    threshold: float = float("nan")
    fmr: float = float("nan")             # target
    achieved_fmr: float = float("nan")
    impostors: int = 0

    def at(self, fractions) -> np.ndarray:
        """The curve's (piecewise-linear) value at the given rejected fractions."""
        return np.interp(np.asarray(fractions, dtype=np.float64), self.reject, self.error)


def threshold_at_fmr(scores: np.ndarray, labels: np.ndarray, fmr: float) -> Tuple[float, float, int]:
    """``(threshold, achieved FMR, impostor count)`` by the rule of the module docstring."""
    impostor = np.sort(np.asarray(scores, dtype=np.float64)[~np.asarray(labels, dtype=bool)])[::-1]
    if impostor.size == 0:
        raise QualityError("error-versus-reject: no impostor pairs, so no threshold at a false-match rate")
    k = int(math.floor(fmr * impostor.size + 1e-9))
    k = min(k, impostor.size - 1)
    threshold = float(impostor[k])
    return threshold, float(np.count_nonzero(impostor > threshold)) / impostor.size, int(impostor.size)


def _quality_groups(quality) -> Tuple[np.ndarray, np.ndarray]:
    """``(order, ends)``: the items in increasing quality and the end of each group of equal quality."""
    quality = np.asarray(quality, dtype=np.float64).reshape(-1)
    if np.isnan(quality).any():
        raise QualityError("error-versus-reject: the quality scores hold NaN")
    order = np.argsort(quality, kind="stable")
    q = quality[order]
    return order, np.flatnonzero(np.r_[q[1:] != q[:-1], True]) + 1


def _reject_points(errors: np.ndarray, counted: np.ndarray, groups: Tuple[np.ndarray, np.ndarray],
                   max_reject: float) -> Tuple[np.ndarray, np.ndarray]:
    """Points ``(k / N, error rate of the remaining counted items)`` for ``k = 0 .. K + 1`` (where
    ``K = floor(max_reject * N)``, capped at N), with ties rejected in expectation."""
    order, ends = groups
    n = order.size
    e = np.asarray(errors, dtype=np.float64).reshape(-1)[order]
    c = np.asarray(counted, dtype=np.float64).reshape(-1)[order]
    # cumulative counts at the ends of the groups of equal quality; linear in between (expectation)
    knots = np.r_[0, ends].astype(np.float64)
    cum_e = np.r_[0.0, np.cumsum(e)[ends - 1]]
    cum_c = np.r_[0.0, np.cumsum(c)[ends - 1]]
    last = min(n, int(math.floor(max_reject * n + 1e-9)) + 1)
    k = np.arange(last + 1, dtype=np.float64)
    rejected_e, rejected_c = np.interp(k, knots, cum_e), np.interp(k, knots, cum_c)
    left_c = cum_c[-1] - rejected_c
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(left_c > 1e-12, (cum_e[-1] - rejected_e) / np.where(left_c > 1e-12, left_c, 1.0), np.nan)
    return k / n, rate


def partial_auc(reject: np.ndarray, error: np.ndarray, max_reject: float = DEFAULT_MAX_REJECT) -> float:
    """Area under the piecewise-linear curve through ``(reject, error)`` from 0 to ``max_reject``,
    divided by ``max_reject`` (the mean error over that range)."""
    reject, error = np.asarray(reject, dtype=np.float64), np.asarray(error, dtype=np.float64)
    inside = reject < max_reject
    xs = np.r_[reject[inside], max_reject]
    ys = np.r_[error[inside], np.interp(max_reject, reject, error)]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / max_reject)


def _curve(errors, counted, quality, max_reject: float, groups=None, **extra) -> RejectCurve:
    if not 0 < max_reject <= 1:
        raise QualityError(f"max_reject must lie in (0, 1], got {max_reject}")
    counted = np.asarray(counted, dtype=bool).reshape(-1)
    if not counted.any():
        raise QualityError("error-versus-reject: nothing to count (no genuine pairs / mated probes)")
    reject, error = _reject_points(errors, counted, groups or _quality_groups(quality), max_reject)
    return RejectCurve(reject, error, partial_auc(reject, error, max_reject), max_reject,
                       int(counted.size), int(counted.sum()), **extra)


def _check_lengths(what: str, *arrays) -> None:
    sizes = {np.asarray(a).reshape(-1).size for a in arrays}
    if len(sizes) != 1:
        raise QualityError(f"{what}: inputs of different lengths {sorted(sizes)}")


def error_versus_reject(scores, labels, pair_quality, fmr: Union[float, Sequence[float]] = DEFAULT_FMRS,
                        max_reject: float = DEFAULT_MAX_REJECT, warn: bool = True) -> Dict[float, RejectCurve]:
    """EVRC of verification pairs, one curve per target FMR (see the module docstring for the rules).

    ``scores``: similarity per pair (higher = more alike); ``labels``: True for genuine pairs;
    ``pair_quality``: one quality per pair (use :func:`pair_quality`). Returns ``{fmr: RejectCurve}``;
    ``warn``: log when there are too few impostor pairs to measure a target FMR.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    _check_lengths("error_versus_reject", scores, labels, pair_quality)
    curves = {}
    groups = _quality_groups(pair_quality)
    for target in np.atleast_1d(fmr):
        threshold, achieved, impostors = threshold_at_fmr(scores, labels, float(target))
        if warn and target * impostors < 1:
            logger.warning("error-versus-reject: %d impostor pairs cannot measure FMR %g (that needs %d); the "
                           "threshold is the highest impostor score (FMR 0)", impostors, target,
                           int(math.ceil(1 / target)))
        false_non_match = labels & ~(scores > threshold)
        curves[float(target)] = _curve(false_non_match, labels, pair_quality, max_reject, groups, threshold=threshold,
                                       fmr=float(target), achieved_fmr=achieved, impostors=impostors)
    return curves


def rank1_misses(score_mat: np.ndarray, label_mat: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(mated, miss)`` per probe: whether it has a mate in the gallery, and whether a mated probe's
    best-ranked mate is not at rank 1 (rank order of :func:`utils.identification.mate_ranks`)."""
    from utils.identification import mate_ranks

    label_mat = np.asarray(label_mat, dtype=bool)
    mated = label_mat.any(axis=1)
    miss = np.zeros(len(label_mat), dtype=bool)
    if mated.any():
        miss[mated] = mate_ranks(np.asarray(score_mat)[mated], label_mat[mated]) > 0
    return mated, miss


def identification_versus_reject(score_mat, label_mat, probe_quality,
                                 max_reject: float = DEFAULT_MAX_REJECT) -> RejectCurve:
    """Identification error (1 - rank-1 over the remaining mated probes) against the fraction of
    probes rejected by quality (lowest first; ties in expectation as for pairs)."""
    mated, miss = rank1_misses(score_mat, label_mat)
    _check_lengths("identification_versus_reject", mated, probe_quality)
    return _curve(miss, mated, probe_quality, max_reject)


def random_rejection(curve: RejectCurve) -> RejectCurve:
    """The expected curve of rejection at random: flat at the error before any rejection."""
    error = np.full_like(curve.error, curve.error[0])
    return RejectCurve(curve.reject.copy(), error, float(curve.error[0]), curve.max_reject, curve.items,
                       curve.counted, curve.threshold, curve.fmr, curve.achieved_fmr, curve.impostors)


# ------------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------------
def template_quality(image_quality, templates, medias) -> Tuple[np.ndarray, np.ndarray]:
    """Quality of each template: the mean over its media of the mean quality of the media's images
    (the aggregation of the template feature: average within a media, then combine the media, so a
    video of 100 frames weighs as much as one still). Returns ``(unique templates (sorted),
    quality)``."""
    image_quality = np.asarray(image_quality, dtype=np.float64).reshape(-1)
    templates, medias = np.asarray(templates).reshape(-1), np.asarray(medias).reshape(-1)
    _check_lengths("template_quality", image_quality, templates, medias)
    pairs, media_of = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    media_of = media_of.reshape(-1)
    media_mean = np.bincount(media_of, image_quality) / np.bincount(media_of)
    unique_templates, template_of = np.unique(pairs[:, 0], return_inverse=True)
    template_of = template_of.reshape(-1)
    return unique_templates, np.bincount(template_of, media_mean) / np.bincount(template_of)
