"""IJB-B / IJB-C evaluation: meta files, template features, 1:1 scores, TAR@FAR and 1:N.

Definitions (InsightFace's IJB evaluation, as used by AdaFace's ``validate_IJB_BC.py``):

* template feature: the image features of a template are averaged within each media (the frames of
  one video share a media id), the media averages are summed and the sum is L2-normalised; templates
  are ordered as ``np.unique(templates)``;
* 1:1 score of a template pair: the dot product of the two template features;
* TAR@FAR: the ROC curve of ``sklearn.metrics.roc_curve(labels, scores)`` (default
  ``drop_intermediate=True``) is reversed, and for each FAR target the operating point whose FPR is
  nearest (the first such point in the reversed curve, i.e. the one with the highest TPR) gives the TAR;
* 1:N (:func:`identification`), per gallery: rank-k identification rate over the probes whose subject
  is in the gallery (closed set) and TPIR at FPIR (open set, rank 1, thresholds from the top scores of
  the probes whose subject is not in the gallery); see :mod:`utils.identification` for the exact
  definitions. InsightFace's helper instead merges G1 and G2 into one gallery, so that every probe has
  a mate, and reports top-1/5/10 of that merged gallery: call :func:`identification` with the
  concatenated galleries to get those numbers.

The meta files are read by :func:`read_ijb_protocol`, which parses every line (:mod:`utils.meta_files`)
and cross-checks the files before anything is embedded.

The fast functions are vectorised and give the same values (up to float32 rounding) as the plain
loops :func:`image2template_feature_reference` and :func:`verification_reference`, which mirror the
published helper and serve as test and benchmark references.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse
from sklearn.metrics import roc_curve
from prettytable import PrettyTable
from tqdm import tqdm

from utils.identification import rank_rates, tpir_at_fpir
from utils.meta_files import fail, line_of_row, read_csv_table, read_whitespace_table

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FAR_TARGETS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

MEDIA_COLUMNS = (("image", "str"), ("template", "int"), ("media", "int"))
PAIR_COLUMNS = (("t1", "int"), ("t2", "int"), ("label", "int"))
LANDMARK_COORDS = tuple(f"{axis}{i}" for i in range(1, 6) for axis in ("x", "y"))
LANDMARK_COLUMNS = (("image", "str"), *((c, "float") for c in LANDMARK_COORDS), ("faceness", "float"))
ONE_TO_N_COLUMNS = (("TEMPLATE_ID", "int"), ("SUBJECT_ID", "int"))


# ----------------------------------------------------------------------------------------------
# meta files
# ----------------------------------------------------------------------------------------------
def ijb_meta_paths(data_root: PathLike, dataset_name: str = "IJBC",
                   parts: Iterable[str] = ("landmarks", "verification", "identification")) -> Dict[str, Path]:
    """Paths of the InsightFace IJB release files under ``<data_root>/<IJBB|IJBC>/``.

    ``parts`` selects what must exist: ``landmarks`` (``loose_crop/`` and ``*_name_5pts_score.txt``),
    ``verification`` (``*_face_tid_mid.txt``, ``*_template_pair_label.txt``) and ``identification``
    (``*_face_tid_mid.txt`` and the 1:N gallery/probe csv files). Raises ``FileNotFoundError`` listing
    every missing path.
    """
    name = dataset_name.upper()
    if name not in ("IJBB", "IJBC"):
        raise ValueError(f"dataset_name must be 'IJBB' or 'IJBC', got {dataset_name!r}")
    prefix = name.lower()
    galleries = ("G1", "G2") if name == "IJBC" else ("S1", "S2")
    base = Path(data_root) / name
    meta = base / "meta"
    paths = {
        "image_dir": base / "loose_crop",
        "landmarks": meta / f"{prefix}_name_5pts_score.txt",
        "template_media": meta / f"{prefix}_face_tid_mid.txt",
        "template_pairs": meta / f"{prefix}_template_pair_label.txt",
        "gallery_1": meta / f"{prefix}_1N_gallery_{galleries[0]}.csv",
        "gallery_2": meta / f"{prefix}_1N_gallery_{galleries[1]}.csv",
        "probe": meta / f"{prefix}_1N_probe_mixed.csv",
    }
    needed = {"landmarks": ("image_dir", "landmarks"),
              "verification": ("template_media", "template_pairs"),
              "identification": ("template_media", "gallery_1", "gallery_2", "probe")}
    parts = list(parts)
    unknown = [p for p in parts if p not in needed]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {sorted(needed)}")
    missing = sorted({str(paths[key]) for part in parts for key in needed[part] if not paths[key].exists()})
    if missing:
        raise FileNotFoundError(f"{name} release files missing under {data_root} ("
                                f"the InsightFace IJB layout is expected):\n  " + "\n  ".join(missing))
    return paths


def read_template_media_list(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_face_tid_mid.txt`` (``image template_id media_id``) -> ``(images, templates, medias)``.

    Every line must hold the three columns, the ids integers (:mod:`utils.meta_files`)."""
    table = read_whitespace_table(path, MEDIA_COLUMNS)
    return table["image"].to_numpy(dtype=object), table["template"].to_numpy(), table["media"].to_numpy()


def read_template_pair_list(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_template_pair_label.txt`` (``template1 template2 label``) -> ``(t1, t2, label)``; labels 0 or 1."""
    table = read_whitespace_table(path, PAIR_COLUMNS)
    label = table["label"].to_numpy()
    bad = np.flatnonzero((label != 0) & (label != 1))
    if len(bad):
        raise fail(path, line_of_row(path, int(bad[0])), f"the label must be 0 or 1, found {label[bad[0]]}")
    return table["t1"].to_numpy(), table["t2"].to_numpy(), label


def read_landmarks(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_name_5pts_score.txt`` (``image x1 y1 ... x5 y5 faceness``) ->
    ``(images, landmarks (N, 5, 2) float32, faceness (N,) float32)``.

    Every line must hold 12 columns, the 10 coordinates and the faceness finite numbers, and the 5
    points of a line must not coincide (no similarity transform would exist)."""
    table = read_whitespace_table(path, LANDMARK_COLUMNS)
    landmarks = table[list(LANDMARK_COORDS)].to_numpy(dtype=np.float64).reshape(-1, 5, 2)
    spread = np.sum(np.square(landmarks - landmarks.mean(axis=1, keepdims=True)), axis=(1, 2))
    degenerate = np.flatnonzero(spread <= 1e-12)
    if len(degenerate):
        raise fail(path, line_of_row(path, int(degenerate[0])), "the 5 landmarks coincide, so the face cannot "
                                                               "be aligned")
    return (table["image"].to_numpy(dtype=object), landmarks.astype(np.float32),
            table["faceness"].to_numpy(dtype=np.float32))


def read_1n_csv(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """A 1:N gallery/probe csv (header ``TEMPLATE_ID,SUBJECT_ID,FILENAME,...``, one row per image) ->
    ``(template_ids, subject_ids)`` per row; every line has the header's number of columns."""
    table = read_csv_table(path, ONE_TO_N_COLUMNS)
    return table["TEMPLATE_ID"].to_numpy(), table["SUBJECT_ID"].to_numpy()


def unique_template_subjects(template_ids: np.ndarray, subject_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row ids of a 1:N csv -> ``(unique templates (sorted), subject of each)`` (the first row's
    subject, as the published helper takes it)."""
    template_ids, subject_ids = np.asarray(template_ids), np.asarray(subject_ids)
    if template_ids.shape != subject_ids.shape:
        raise ValueError(f"template_ids {template_ids.shape} and subject_ids {subject_ids.shape} differ in length")
    unique_templates, first = np.unique(template_ids, return_index=True)
    return unique_templates, subject_ids[first]


@dataclass
class IJBProtocol:
    """Every meta file of an IJB-B/C release, read and checked against each other (:func:`read_ijb_protocol`)."""

    images: np.ndarray                          # image names, in the order of the template/media list
    templates: np.ndarray                       # template id of each image
    medias: np.ndarray                          # media id of each image
    p1: np.ndarray                              # 1:1 pairs: template ids and labels
    p2: np.ndarray
    labels: np.ndarray
    probe: Tuple[np.ndarray, np.ndarray]        # 1:N probe templates (sorted) and their subjects
    galleries: Dict[str, Tuple[np.ndarray, np.ndarray]]    # "G1"/"S1" -> gallery templates and subjects
    landmarks: Optional[np.ndarray] = None      # (N, 5, 2) float32, with ``read_landmarks=True``
    faceness: Optional[np.ndarray] = None


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _known_mask(unique_templates: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` that are in the sorted, unique integer ``unique_templates`` (a lookup table when compact)."""
    low, high = int(unique_templates[0]), int(unique_templates[-1])
    if len(ids) == 0 or high - low >= max(16 * len(unique_templates), 1 << 22):
        return np.isin(ids, unique_templates)
    if int(ids.min()) < low or int(ids.max()) > high:
        inside = (ids >= low) & (ids <= high)
        found = np.zeros(len(ids), dtype=bool)
        found[inside] = _known_mask(unique_templates, ids[inside])
        return found
    base = 0 if low >= 0 else low                   # ids index the table directly when not negative
    table = np.zeros(high - base + 1, dtype=bool)
    table[unique_templates - base] = True
    return table[ids - base if base else ids]


def _check_known_templates(path: Path, ids: np.ndarray, unique_templates: np.ndarray, media_file: Path,
                           header: bool, column: str) -> None:
    found = _known_mask(unique_templates, ids)
    if not found.all():
        row = _first_row(~found)
        raise fail(path, line_of_row(path, row, header),
                   f"template {ids[row]} ({column}) has no image in {media_file.name} "
                   f"({int(np.sum(~found))} such lines)",
                   "use the meta files of one release (IJB-B and IJB-C ids differ) or restore them")


def _check_1n_lists(lists: Mapping[str, Tuple[Path, np.ndarray, np.ndarray]]) -> None:
    """One subject per template over all 1:N files; at most one template per (gallery, probe subject)."""
    names = list(lists)
    tids = np.concatenate([lists[n][1] for n in names])
    sids = np.concatenate([lists[n][2] for n in names])
    source = np.repeat(np.arange(len(names)), [len(lists[n][1]) for n in names])
    row = np.concatenate([np.arange(len(lists[n][1])) for n in names])
    order = np.lexsort((sids, tids))
    clash = np.flatnonzero((tids[order][1:] == tids[order][:-1]) & (sids[order][1:] != sids[order][:-1]))
    if len(clash):
        a, b = order[clash[0]], order[clash[0] + 1]
        path_a, path_b = lists[names[source[a]]][0], lists[names[source[b]]][0]
        raise fail(path_b, line_of_row(path_b, int(row[b]), True),
                   f"template {tids[b]} has subject {sids[b]} here but subject {sids[a]} in "
                   f"{path_a.name}, line {line_of_row(path_a, int(row[a]), True)}")
    probe_subjects = np.unique(lists["probe"][2])
    for name in names[:-1]:
        path, t, s = lists[name]
        unique_t, first = np.unique(t, return_index=True)
        subjects = s[first]
        mated = np.isin(subjects, probe_subjects)
        if not mated.any():
            raise fail(path, None, f"no subject of this gallery has a probe in {lists['probe'][0].name}",
                       "use the gallery and probe files of one release")
        values, counts = np.unique(subjects[mated], return_counts=True)
        if np.any(counts > 1):
            subject = values[counts > 1][0]
            second = first[subjects == subject][1]
            raise fail(path, line_of_row(path, int(second), True),
                       f"subject {subject} has a second template ({t[second]}) in this gallery; open-set "
                       f"identification needs one template per subject and gallery")


def read_ijb_protocol(paths: Mapping[str, Path], read_landmark_file: bool = True) -> IJBProtocol:
    """Read and cross-check the meta files of :func:`ijb_meta_paths` before anything is embedded.

    Raises :class:`utils.meta_files.MetaFileError` (file, line, problem, what to do) for: a line that
    does not parse (column count, numbers, finite coordinates); an image listed twice; a landmark
    file that does not list the images of the template/media list in the same order; 5 landmarks
    that coincide; a pair label other than 0/1, or labels of one kind only; a pair or 1:N template
    without images; a template with two subjects; an empty 1:N list; a gallery without mated probes
    or with two templates of one probe subject.
    """
    media_path = Path(paths["template_media"])
    images, templates, medias = read_template_media_list(media_path)
    if len(images) == 0:
        raise fail(media_path, None, "lists no image")
    order = np.argsort(images, kind="stable")
    repeated = np.flatnonzero(images[order][1:] == images[order][:-1])
    if len(repeated):
        row = int(order[repeated[0] + 1])
        raise fail(media_path, line_of_row(media_path, row), f"image {images[row]} is listed a second time")
    landmarks = faceness = None
    if read_landmark_file:
        landmark_path = Path(paths["landmarks"])
        lm_images, landmarks, faceness = read_landmarks(landmark_path)
        common = min(len(lm_images), len(images))
        differ = np.flatnonzero(lm_images[:common] != images[:common])
        if len(differ) or len(lm_images) != len(images):
            row = int(differ[0]) if len(differ) else common
            line = None
            problem = f"lists {len(lm_images)} images, {media_path.name} {len(images)}"
            if row < common:
                line = line_of_row(landmark_path, row)
                problem = (f"image {lm_images[row]!r} where {media_path.name} has {images[row]!r} "
                           f"(its line {line_of_row(media_path, row)})")
            raise fail(landmark_path, line, f"{problem}; the two files must list the same images in the same order",
                       "use the landmark and template/media files of one release")
    unique_templates = np.unique(templates)
    pair_path = Path(paths["template_pairs"])
    p1, p2, labels = read_template_pair_list(pair_path)
    for ids, column in ((p1, "template1"), (p2, "template2")):
        _check_known_templates(pair_path, ids, unique_templates, media_path, False, column)
    if not (np.any(labels == 0) and np.any(labels == 1)):
        raise fail(pair_path, None, "needs both genuine (1) and impostor (0) pairs for TAR@FAR")
    lists: Dict[str, Tuple[Path, np.ndarray, np.ndarray]] = {}
    for key in ("gallery_1", "gallery_2", "probe"):
        path = Path(paths[key])
        t, s = read_1n_csv(path)
        if len(t) == 0:
            raise fail(path, None, "lists no template")
        _check_known_templates(path, t, unique_templates, media_path, True, "TEMPLATE_ID")
        lists[path.stem.rsplit("_", 1)[-1] if key != "probe" else "probe"] = (path, t, s)
    _check_1n_lists(lists)
    return IJBProtocol(images, templates, medias, p1, p2, labels,
                       unique_template_subjects(lists["probe"][1], lists["probe"][2]),
                       {name: unique_template_subjects(t, s) for name, (_, t, s) in lists.items() if name != "probe"},
                       landmarks, faceness)


# ----------------------------------------------------------------------------------------------
# template features
# ----------------------------------------------------------------------------------------------
def _check_image_inputs(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> None:
    if img_feats.ndim != 2:
        raise ValueError(f"img_feats must have shape (num_images, D), got {img_feats.shape}")
    if templates.shape != (img_feats.shape[0],) or medias.shape != (img_feats.shape[0],):
        raise ValueError(f"templates {templates.shape} and medias {medias.shape} must hold one id per image "
                         f"({img_feats.shape[0]} images)")


def _normalize_rows(feats: np.ndarray, out_dtype) -> np.ndarray:
    norms = np.sqrt(np.sum(np.square(feats, dtype=np.float64), axis=1, keepdims=True))
    if np.any(norms == 0):
        logger.warning("%d templates have a zero feature sum; their normalised features are NaN",
                       int(np.sum(norms == 0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (feats / norms).astype(out_dtype, copy=False)


def image_features_for_templates(features: np.ndarray, norms: np.ndarray, fusion_method: str) -> np.ndarray:
    """What the published IJB scripts aggregate into templates: with ``pre_norm_vector_add`` the
    normalised image features times their norms, else the normalised features."""
    return features * norms if fusion_method == "pre_norm_vector_add" else features


def image2template_feature(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Template features from image features: mean per media, sum over medias, L2-normalise.

    Returns ``(template_norm_feats (T, D), unique_templates (T,))`` with ``unique_templates =
    np.unique(templates)``. One sparse (templates x images) matrix of weights ``1 / media size``
    does the aggregation; float32 input gives float32 output (the normalisation runs in float64).
    """
    img_feats = np.asarray(img_feats)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    _check_image_inputs(img_feats, templates, medias)
    work_dtype = np.result_type(img_feats.dtype, np.float32)
    unique_templates, template_index = np.unique(templates, return_inverse=True)
    unique_medias, media_index = np.unique(medias, return_inverse=True)
    group_key = template_index.astype(np.int64) * len(unique_medias) + media_index
    _, group_index, group_size = np.unique(group_key, return_inverse=True, return_counts=True)
    weights = (1.0 / group_size)[group_index].astype(work_dtype)
    aggregation = scipy.sparse.csr_matrix(
        (weights, (template_index, np.arange(len(templates)))), shape=(len(unique_templates), len(templates)))
    template_feats = aggregation @ img_feats.astype(work_dtype, copy=False)
    return _normalize_rows(np.asarray(template_feats), work_dtype), unique_templates


def image2template_feature_reference(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                                     ) -> Tuple[np.ndarray, np.ndarray]:
    """Plain loop over templates and medias, as the published InsightFace helper does (float64 output)."""
    img_feats = np.asarray(img_feats)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    _check_image_inputs(img_feats, templates, medias)
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for row, template in enumerate(unique_templates):
        (in_template,) = np.where(templates == template)
        feats, template_medias = img_feats[in_template], medias[in_template]
        media_means = [feats[template_medias == media].mean(axis=0) for media in np.unique(template_medias)]
        template_feats[row] = np.sum(media_means, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return template_feats / np.sqrt(np.sum(template_feats ** 2, -1, keepdims=True)), unique_templates


def _lookup_rows(unique_templates: np.ndarray, template_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows, found)``: the row of each id in the sorted, unique ``unique_templates`` (valid where
    ``found``). Integer ids in a compact range go through a lookup table (one gather per id), others
    through ``np.searchsorted``."""
    integer = np.issubdtype(unique_templates.dtype, np.integer) and np.issubdtype(template_ids.dtype, np.integer)
    low, high = unique_templates[0], unique_templates[-1]
    if integer and int(high) - int(low) < max(16 * len(unique_templates), 1 << 22):
        span = int(high) - int(low) + 1
        table = np.zeros(span, dtype=np.intp)
        table[unique_templates - low] = np.arange(len(unique_templates))
        offsets = template_ids.astype(np.int64) - int(low)
        np.clip(offsets, 0, span - 1, out=offsets)          # out-of-range ids fail the check below
        rows = table[offsets]
    else:
        rows = np.searchsorted(unique_templates, template_ids)
        np.clip(rows, 0, len(unique_templates) - 1, out=rows)
    return rows, unique_templates[rows] == template_ids


def template_rows(unique_templates: np.ndarray, template_ids: np.ndarray, what: str = "template ids") -> np.ndarray:
    """Row of each id in the sorted ``unique_templates``; ``ValueError`` naming ids that are absent."""
    unique_templates = np.asarray(unique_templates)
    template_ids = np.asarray(template_ids)
    if unique_templates.ndim != 1 or (len(unique_templates) > 1 and np.any(np.diff(unique_templates) <= 0)):
        raise ValueError("unique_templates must be sorted and unique (as returned by image2template_feature)")
    if len(unique_templates) == 0:
        raise ValueError(f"{what}: there are no templates")
    rows, found = _lookup_rows(unique_templates, template_ids)
    if not found.all():
        missing = np.unique(template_ids[~found])
        raise ValueError(f"{what}: {len(missing)} template id(s) have no images in the template/media list, "
                         f"e.g. {missing[:10].tolist()}")
    return rows


def _scores_by_gram(feats: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
                    left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Scores read off the Gram matrix between the templates used on each side of the pairs."""
    num_right = int(right.sum())
    start_of_row = (np.cumsum(left, dtype=np.intp) - 1) * num_right     # per template, its row start
    position2 = np.cumsum(right, dtype=np.intp) - 1
    gram = feats[left] @ feats[right].T
    flat = start_of_row[rows1]
    flat += position2[rows2]
    return np.take(gram.ravel(), flat)


def _scores_by_gather(feats: np.ndarray, rows1: np.ndarray, rows2: np.ndarray, batch_size: int,
                      progress: bool) -> np.ndarray:
    """Row-wise dot products, gathering the pair features chunk by chunk into reused buffers."""
    num_pairs, dim = len(rows1), feats.shape[1]
    buffer1 = np.empty((batch_size, dim), dtype=feats.dtype)
    buffer2 = np.empty((batch_size, dim), dtype=feats.dtype)
    scores = np.empty(num_pairs, dtype=feats.dtype)
    for start in tqdm(range(0, num_pairs, batch_size), desc="pair scores", unit="chunk", disable=not progress):
        stop = min(start + batch_size, num_pairs)
        n = stop - start
        # indices were validated; mode='clip' avoids the extra buffering of mode='raise'
        np.take(feats, rows1[start:stop], axis=0, out=buffer1[:n], mode="clip")
        np.take(feats, rows2[start:stop], axis=0, out=buffer2[:n], mode="clip")
        np.einsum("ij,ij->i", buffer1[:n], buffer2[:n], out=scores[start:stop])
    return scores


def verification(template_norm_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                 batch_size: int = 4096, method: str = "auto", max_gram_bytes: int = 2 << 30,
                 progress: bool = False) -> np.ndarray:
    """Score (dot product of template features) of every template pair ``(p1[i], p2[i])``; float64.

    ``method``: ``'gather'`` gathers the two features of ``batch_size`` pairs at a time into reused
    buffers and takes row-wise dot products; ``'gram'`` computes all dot products between the
    templates used as ``p1`` and those used as ``p2`` with one matrix product and reads the pairs off
    it (much faster when the pairs cover a good part of that grid, as the IJB protocols' enrollment x
    verification pairs do); ``'auto'`` takes ``'gram'`` when the grid is at most 8 times the number of
    pairs and fits in ``max_gram_bytes``.
    """
    feats = np.ascontiguousarray(template_norm_feats)
    if feats.ndim != 2 or feats.shape[0] != len(unique_templates):
        raise ValueError(f"template_norm_feats {feats.shape} must have one row per unique template "
                         f"({len(unique_templates)})")
    p1, p2 = np.asarray(p1).ravel(), np.asarray(p2).ravel()
    if p1.shape != p2.shape:
        raise ValueError(f"p1 ({p1.shape[0]}) and p2 ({p2.shape[0]}) must list the same number of pairs")
    if method not in ("auto", "gram", "gather"):
        raise ValueError(f"method must be 'auto', 'gram' or 'gather', got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows1 = template_rows(unique_templates, p1, "p1")
    rows2 = template_rows(unique_templates, p2, "p2")
    if len(p1) == 0:
        return np.zeros(0)

    left = np.zeros(len(feats), dtype=bool)
    left[rows1] = True
    right = np.zeros(len(feats), dtype=bool)
    right[rows2] = True
    grid = int(left.sum()) * int(right.sum())
    if method == "auto":
        method = "gram" if grid <= 8 * len(p1) and grid * feats.itemsize <= max_gram_bytes else "gather"
    logger.debug("verification: %d pairs, %d x %d template grid, method %s", len(p1), left.sum(), right.sum(), method)
    if method == "gram":
        scores = _scores_by_gram(feats, rows1, rows2, left, right)
    else:
        scores = _scores_by_gather(feats, rows1, rows2, batch_size, progress)
    return scores.astype(np.float64, copy=False)


def verification_reference(template_norm_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray,
                           p2: np.ndarray, batch_size: int = 100000) -> np.ndarray:
    """Plain implementation as published: an id -> row table, then fancy indexing and an element-wise
    product summed per pair, ``batch_size`` pairs per step of a Python loop."""
    template_to_row = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for row, template in enumerate(unique_templates):
        template_to_row[template] = row
    score = np.zeros((len(p1),))
    all_pairs = np.arange(len(p1))
    for start in range(0, len(p1), batch_size):
        chunk = all_pairs[start:start + batch_size]
        feat1 = template_norm_feats[template_to_row[p1[chunk]]]
        feat2 = template_norm_feats[template_to_row[p2[chunk]]]
        score[chunk] = np.sum(feat1 * feat2, -1).flatten()
    return score


# ----------------------------------------------------------------------------------------------
# TAR @ FAR
# ----------------------------------------------------------------------------------------------
def tar_at_far(scores: np.ndarray, labels: np.ndarray, far_targets: Sequence[float] = FAR_TARGETS
               ) -> Dict[float, float]:
    """TAR at each FAR target, read off ``sklearn.metrics.roc_curve`` at the nearest FPR (see module doc)."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    classes = np.unique(labels)
    if not (len(classes) == 2 and set(classes.tolist()) == {0, 1}):
        raise ValueError(f"labels must contain both 0 (impostor) and 1 (genuine), found {classes[:10].tolist()}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite")
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)      # the highest TPR first among equal FPRs
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in far_targets}


def format_tar_far_table(results: Mapping[str, Mapping[float, float]],
                         far_targets: Optional[Sequence[float]] = None) -> PrettyTable:
    """A table with one row per method (``results[name] = {far: tar}``) and TAR in percent (two decimals)."""
    if far_targets is None:
        far_targets = list(next(iter(results.values())).keys()) if results else list(FAR_TARGETS)
    table = PrettyTable(["Methods"] + [str(far) for far in far_targets])
    for name, row in results.items():
        table.add_row([name] + ["%.2f" % (row[far] * 100) for far in far_targets])
    return table


# ----------------------------------------------------------------------------------------------
# 1:N identification
# ----------------------------------------------------------------------------------------------
def select_template_features(template_feats: np.ndarray, unique_templates: np.ndarray,
                             wanted_templates: np.ndarray) -> np.ndarray:
    """Rows of ``template_feats`` for ``wanted_templates`` (e.g. a gallery's templates)."""
    return np.asarray(template_feats)[template_rows(unique_templates, wanted_templates, "wanted templates")]


def identification(gallery_feats: np.ndarray, gallery_ids: np.ndarray, probe_feats: np.ndarray,
                   probe_ids: np.ndarray, ranks: Sequence[int] = (1, 5, 10),
                   fpirs: Sequence[float] = (0.01, 0.1)) -> Dict[str, float]:
    """1:N search of the probes in one gallery (scores: dot products of the template features).

    Returns fractions in [0, 1]: ``rank-k`` (closed set, over the probes whose subject is in the
    gallery), ``TPIR@FPIR=f`` (open set at rank 1, thresholds from the top scores of the probes whose
    subject is not in the gallery; NaN when every probe is mated), the achieved ``FPIR@FPIR=f``, and
    the probe counts ``num_mated`` / ``num_nonmated``.
    """
    gallery_feats, probe_feats = np.asarray(gallery_feats), np.asarray(probe_feats)
    gallery_ids, probe_ids = np.asarray(gallery_ids).ravel(), np.asarray(probe_ids).ravel()
    if gallery_feats.ndim != 2 or probe_feats.ndim != 2 or gallery_feats.shape[1] != probe_feats.shape[1]:
        raise ValueError(f"gallery_feats {gallery_feats.shape} and probe_feats {probe_feats.shape} must be "
                         f"(N, D) with the same D")
    if len(gallery_ids) != len(gallery_feats) or len(probe_ids) != len(probe_feats):
        raise ValueError("gallery_ids/probe_ids must hold one id per feature row")
    scores = probe_feats @ gallery_feats.T
    labels = probe_ids[:, None] == gallery_ids[None, :]
    mated = labels.any(axis=1)
    result = {**rank_rates(scores, labels, ranks), **tpir_at_fpir(scores, labels, fpirs)}
    result["num_mated"] = int(mated.sum())
    result["num_nonmated"] = int((~mated).sum())
    return result


def mean_over_galleries(results: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Average the metrics of several galleries (G1/G2 or S1/S2); probe counts are summed."""
    if not results:
        raise ValueError("mean_over_galleries needs at least one result")
    keys = [k for k in results[0] if all(k in r for r in results)]
    return {k: (int(sum(r[k] for r in results)) if k.startswith("num_")
                else float(np.mean([r[k] for r in results]))) for k in keys}
