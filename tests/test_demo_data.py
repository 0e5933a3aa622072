"""Tests of utils.demo_data: determinism, the real formats, disjoint identities, quality records."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from utils.demo_data import (IdentityBank, Quality, RenderInfo, draw_quality, ensure_demo_data,
                             generate_demo_data, main, read_quality_table, render_identity_image)
from utils.image import decode_image_bytes, rgb_to_input_array
from utils.pairsets import VAL_SET_NAMES, load_pair_bin, open_memfile
from utils.recordio import RecordReader, load_face_pack_index, read_face_record

TINY = dict(num_train_ids=4, imgs_per_id=3, num_val_ids=5, pairs_per_set=4, show_progress=False)


def _data_files(root: Path) -> dict:
    """Bytes of every file that must be deterministic (the memfile .conf names its source path)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".conf") and p.suffix != ".npz"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return generate_demo_data(tmp_path_factory.mktemp("demo") / "d", seed=3, **TINY)


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = generate_demo_data(tmp_path / "again", seed=3, **TINY)
    first, second = _data_files(tiny["root"]), _data_files(again["root"])
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]
    other = _data_files(generate_demo_data(tmp_path / "other", seed=4, **TINY)["root"])
    assert other.keys() == first.keys()
    for name in ["train.rec", "lfw.bin", "quality.csv"]:
        assert other[name] != first[name]


def test_pack_and_image_folder_hold_the_same_images(tiny):
    root = tiny["root"]
    index = load_face_pack_index(tiny["rec"], cache_dir=root / "cache", show_progress=False)
    assert index.num_classes == 4 and len(index) == 12
    assert index.keys.tolist() == list(range(1, 13))
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    reader = RecordReader(tiny["rec"])
    folder_files = sorted((root / "imgs").rglob("*.jpg"))
    assert len(folder_files) == 12
    for key, label, path in zip(index.keys, index.labels, folder_files):
        header, payload = read_face_record(reader, int(key))
        assert int(header.label) == label
        assert path.parent.name == str(label) and path.stem == f"{key:02d}"
        assert path.read_bytes() == payload
        assert decode_image_bytes(payload).shape == (112, 112, 3)


def test_pair_sets_real_format_half_same_and_memfiles(tiny):
    root = tiny["root"]
    for name in VAL_SET_NAMES:
        images, issame = load_pair_bin(root / f"{name}.bin")
        assert len(images) == 8 and issame.tolist().count(True) == 2
        memmap, issame_mem = open_memfile(root, name)
        assert np.array_equal(issame_mem, issame)
        for i in (0, 5):
            expected = rgb_to_input_array(decode_image_bytes(images[i]))
            assert np.array_equal(np.asarray(memmap[i]), expected)


def test_quality_table_and_disjoint_identities(tiny):
    rows = read_quality_table(tiny["quality_csv"])
    train = [r for r in rows if r["split"] == "train"]
    pairs = [r for r in rows if r["split"] != "train"]
    assert len(train) == 12 and len(pairs) == 5 * 8
    assert {r["identity"] for r in train}.isdisjoint({r["identity"] for r in pairs})
    assert all(r["identity"].startswith("train/") for r in train)
    assert all(r["identity"].startswith("val/") for r in pairs)
    for r in rows:
        assert 0.1 <= r["scale"] <= 1.0 and 0.0 <= r["blur_sigma"] <= 1.5
        assert 0.0 <= r["capture_noise"] <= 12.0 and 0.3 <= r["contrast"] <= 1.0
        recorded = Quality(r["scale"], r["blur_sigma"], r["capture_noise"], r["contrast"])
        assert r["quality_score"] == pytest.approx(recorded.score, abs=1e-4)
        assert 0.0 < r["quality_score"] <= 1.0
    # same pairs really show the same identity, different pairs two identities
    for name in VAL_SET_NAMES:
        _, issame = load_pair_bin(tiny["root"] / f"{name}.bin")
        by_index = {r["index"]: r["identity"] for r in pairs if r["split"] == name}
        for p, same in enumerate(issame):
            assert (by_index[2 * p] == by_index[2 * p + 1]) == bool(same)
    meta = json.loads(tiny["meta"].read_text())
    assert meta["params"]["seed"] == 3 and meta["counts"]["train_images"] == 12


def test_quality_degrades_images_as_recorded():
    identity = IdentityBank(0).get("train", 0)
    sharp = render_identity_image(identity, np.random.default_rng(1), Quality())
    low = render_identity_image(identity, np.random.default_rng(1), Quality(scale=0.25))
    blurred = render_identity_image(identity, np.random.default_rng(1), Quality(blur_sigma=1.5))

    def detail(img):  # energy of the Laplacian: fine detail left in the image
        grey = img.astype(np.float32).mean(2)
        lap = grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] \
            - grey[1:-1, 2:]
        return float((lap ** 2).mean())

    assert detail(low) < 0.5 * detail(sharp) and detail(blurred) < 0.5 * detail(sharp)
    flat = render_identity_image(identity, np.random.default_rng(1), Quality(contrast=0.4))
    spread = [img.astype(np.float32).reshape(-1, 3).std(0).mean() for img in (sharp, flat)]
    assert spread[1] == pytest.approx(0.4 * spread[0], rel=0.15)
    clean = render_identity_image(identity, np.random.default_rng(1), Quality(scale=0.25))
    noisy = render_identity_image(identity, np.random.default_rng(1),
                                  Quality(scale=0.25, noise_sigma=10.0))
    assert 2.0 < (noisy.astype(np.float32) - clean).std() < 10.0   # noise at 28 px, scaled up

    assert Quality(scale=0.25).score < Quality(scale=0.5).score < Quality().score == 1.0
    assert Quality(contrast=0.5).score == pytest.approx(0.5)
    assert Quality(noise_sigma=20.0).score == pytest.approx(2 ** -0.5)
    qualities = [draw_quality(np.random.default_rng(s)) for s in range(300)]
    scales = np.array([q.scale for q in qualities])
    assert (scales == 1.0).mean() > 0.3 and scales.min() < 0.15
    poor = [q for q in qualities if q.scale < 1.0]   # poor captures: degradations go together
    assert spearmanr([q.scale for q in poor], [q.contrast for q in poor])[0] > 0.7
    assert spearmanr([q.scale for q in poor], [q.noise_sigma for q in poor])[0] < -0.7
    with pytest.raises(ValueError, match="min_scale"):
        draw_quality(np.random.default_rng(0), min_scale=0.0)


def _identity_difference_left(quality: Quality, pairs: int = 4) -> float:
    """Energy of the difference between two identities' images after ``quality``, as a fraction
    of it in sharp images (both with the same nuisance values, so only the identity differs)."""
    bank, left = IdentityBank(2), []
    for k in range(pairs):
        a, b = bank.get("train", 2 * k), bank.get("train", 2 * k + 1)
        sharp = [render_identity_image(i, np.random.default_rng(k)).astype(np.float32)
                 for i in (a, b)]
        low = [render_identity_image(i, np.random.default_rng(k), quality).astype(np.float32)
               for i in (a, b)]
        left.append(((low[0] - low[1]) ** 2).mean() / ((sharp[0] - sharp[1]) ** 2).mean())
    return float(np.mean(left))


def test_low_quality_removes_identity_detail_as_the_score_says():
    by_scale = [_identity_difference_left(Quality(scale=s)) for s in (1.0, 0.4, 0.2, 0.1)]
    assert by_scale[0] == pytest.approx(1.0) and by_scale == sorted(by_scale, reverse=True)
    assert by_scale[-1] < 0.6
    # contrast 0.4 scales the difference by 0.4 (energy 0.16), except that of the mean colours
    assert 0.15 < _identity_difference_left(Quality(contrast=0.4)) < 0.3
    # over random poor captures (noise left out: the same noise cancels in the difference), the
    # score orders the images by the identity difference they keep
    rng = np.random.default_rng(0)
    drawn = [draw_quality(rng, low_quality_fraction=1.0) for _ in range(16)]
    drawn = [Quality(q.scale, q.blur_sigma, 0.0, q.contrast) for q in drawn]
    left = [_identity_difference_left(q, pairs=2) for q in drawn]
    assert spearmanr([q.score for q in drawn], left)[0] > 0.85


def test_identities_are_distinct_and_stable():
    bank = IdentityBank(7)
    assert bank.get("train", 2) == IdentityBank(7).get("train", 2)
    assert bank.get("train", 2) != bank.get("val", 2) != bank.get("train", 3)
    info = RenderInfo()
    # with the nuisance values fixed (same rng seed), an identity renders the same image and two
    # identities differ, inside the face (the background is nuisance)
    for k in range(4):
        a = render_identity_image(bank.get("train", k), np.random.default_rng(k), info=info)
        again = render_identity_image(bank.get("train", k), np.random.default_rng(k))
        other = render_identity_image(bank.get("train", k + 10), np.random.default_rng(k))
        assert np.array_equal(a, again)
        diff = np.abs(a.astype(np.float32) - other).mean(2)
        assert diff[40:90, 35:77].mean() > 10.0 and diff[40:90, 35:77].mean() > diff[:8, :8].mean()
    assert -1.0 <= info.yaw <= 1.0 and info.noise_sigma > 0


def test_ensure_reuses_a_complete_set_and_regenerates_otherwise(tmp_path):
    out = tmp_path / "d"
    kwargs = dict(TINY, pairs_per_set=2, num_train_ids=2, imgs_per_id=2)
    first = ensure_demo_data(out, **kwargs)
    assert first["generated"]
    stamp = (out / "train.rec").stat().st_mtime_ns
    second = ensure_demo_data(out, **kwargs)
    assert not second["generated"] and (out / "train.rec").stat().st_mtime_ns == stamp
    (out / "lfw.bin").unlink()                      # incomplete -> regenerated
    assert ensure_demo_data(out, **kwargs)["generated"]
    third = ensure_demo_data(out, **dict(kwargs, num_train_ids=3))    # other parameters
    assert third["generated"] and third["counts"]["train_images"] == 6
    assert len(list((out / "imgs").iterdir())) == 3   # stale identity folders removed


def test_quality_table_bad_input_names_the_file(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other\.csv: not a demo-data quality table"):
        read_quality_table(other)
    broken = tmp_path / "quality.csv"
    broken.write_text("split,index,pair,label,identity,file,scale,quality_score\n"
                      "lfw,0,0,-1,val/1,,0.5,0.5\nlfw,x,0,-1,val/1,,0.5,0.5\n")
    with pytest.raises(ValueError, match=r"quality\.csv, line 3: bad number"):
        read_quality_table(broken)
    broken.write_text("split,index,pair,label,identity,file,scale,quality_score\n"
                      "lfw,0,0,-1,val/1,,0.5,0.5\n")            # an older table: fewer columns
    assert read_quality_table(broken) == [{"split": "lfw", "index": 0, "pair": 0, "label": -1,
                                          "identity": "val/1", "file": "", "scale": 0.5,
                                          "quality_score": 0.5}]


def test_refuses_to_overwrite_foreign_image_folder(tmp_path):
    (tmp_path / "imgs" / "someone").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        generate_demo_data(tmp_path, **TINY)


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="validation identities"):
        generate_demo_data(tmp_path, num_val_ids=1, pairs_per_set=2, show_progress=False)
    with pytest.raises(ValueError, match="training identity"):
        generate_demo_data(tmp_path, num_train_ids=0, show_progress=False)


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num_train_ids", "2", "--imgs_per_id", "2",
          "--num_val_ids", "3", "--pairs_per_set", "2", "--no_memfiles"])
    printed = capsys.readouterr().out
    assert "train_images" in printed and "--train_data_path ." in printed
    assert (tmp_path / "cli" / "train.rec").is_file()
    assert not (tmp_path / "cli" / "lfw").exists()


def test_demo_quality_report_on_held_out_pairs(tiny):
    """utils.demo's error-versus-reject report: every measure on the 20 pooled held-out pairs, the
    oracle is the recorded quality_score of each image (by set and index), the indicator uses the
    head's own statistics."""
    from types import SimpleNamespace

    import torch

    from head import AdaFace
    from net import build_model
    from utils.demo import DEMO_FMRS, held_out_embeddings, quality_evrc_report, recorded_quality
    from utils.quality import error_versus_reject, pair_quality, quality_indicator

    names = list(VAL_SET_NAMES)
    rows = read_quality_table(tiny["quality_csv"])
    args = SimpleNamespace(data_root=str(tiny["root"]), val_data_path=".", arch="ir_tiny", seed=0)
    torch.manual_seed(5)
    head = AdaFace(embedding_size=512, classnum=3, h=0.5)
    head.batch_mean.fill_(700.0)
    head.batch_std.fill_(150.0)
    module = SimpleNamespace(model=build_model("ir_tiny").eval(), head=head)
    report = quality_evrc_report(args, module, names, rows)["held-out pairs"]
    assert list(report) == ["trained norm", "trained indicator", "untrained norm", "laplacian", "oracle", "random"]

    oracle = recorded_quality(np.arange(40), names, rows)
    by_key = {(r["split"], r["index"]): r["quality_score"] for r in rows}
    assert oracle[9] == by_key[(names[1], 1)] and oracle[39] == by_key[(names[4], 7)]
    held = held_out_embeddings(module.model, args, names)
    scores = np.sum(held["features"][0::2] * held["features"][1::2], axis=1)
    want = error_versus_reject(scores, held["issame"], pair_quality(oracle[0::2], oracle[1::2]), fmr=DEMO_FMRS)
    for fmr, curve in want.items():
        assert report["oracle"][f"FMR={fmr:g}"].pauc == pytest.approx(curve.pauc)
    norm = held["view_norms"].mean(axis=1)
    indicator = quality_indicator(norm, 700.0, 150.0, 0.5)
    want = error_versus_reject(scores, held["issame"], pair_quality(indicator[0::2], indicator[1::2]), fmr=0.1)[0.1]
    assert report["trained indicator"]["FMR=0.1"].pauc == pytest.approx(want.pauc)
