"""Bad evaluation inputs are reported in one line (file, line, what to do), exit status 2, before
any image is embedded: corrupted IJB-B/C, TinyFace and IJB-S meta files, and the audited options."""
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import utils.eval_common as eval_common
from net import build_model
from tests.scripts import load_script
from utils.checkpoint import save_lightning_style_checkpoint
from utils.demo_data import generate_demo_data
from utils.demo_eval_data import TINYFACE_ALIGNED_DIR, generate_ijb, generate_ijbs, generate_tinyface
from utils.meta_files import MetaFileError, read_whitespace_table

REPO = Path(__file__).resolve().parent.parent


ijb_script = load_script("validation_mixed/validate_IJB_BC.py")
tinyface_script = load_script("validation_lq/validate_tinyface.py")
ijbs_script = load_script("validation_lq/validate_IJB_S.py")
hq_script = load_script("validation_hq/eval_5valsets.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_inputs")
    model = build_model("ir_tiny").eval()
    return {"ckpt": save_lightning_style_checkpoint(root / "tiny.ckpt", model, hyper_parameters={"arch": "ir_tiny"}),
            "ijbc": generate_ijb(root / "ijb", "IJBC", seed=0, num_subjects=2, gallery_images=2, frames_per_video=1),
            "tinyface": generate_tinyface(root / "tf", seed=0, num_subjects=2, probes_per_subject=1,
                                          num_distractors=1),
            "ijbs": generate_ijbs(root / "ijbs", seed=0, num_subjects=4, frames_per_video=1, booking_images=1)}


@pytest.fixture
def nothing_embedded(monkeypatch):
    """Loading a model or embedding an image fails the test: every check must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("an image was embedded (or a model loaded) before the inputs were checked")
    monkeypatch.setattr(eval_common, "load_model", boom)
    monkeypatch.setattr(eval_common, "embed_dataset", boom)
    monkeypatch.setattr(hq_script, "load_model", boom)
    monkeypatch.setattr(hq_script, "embed_dataset", boom)


def one_line_error(script, argv, capsys) -> str:
    """Run ``script`` as its command line does; return its one ``error:`` line (exit status 2)."""
    capsys.readouterr()
    status = script.run_cli(script.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def edit_line(path: Path, number: int, change) -> None:
    """Replace line ``number`` (1-based) of ``path`` by ``change(line)`` (a list of lines is inserted)."""
    lines = path.read_text().splitlines()
    new = change(lines[number - 1])
    lines[number - 1:number] = new if isinstance(new, list) else [new]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# IJB-B / IJB-C
# ------------------------------------------------------------------------------------------------
IJB_CASES = {
    # file, line to change, change, expected message (after "<file>, line N: ")
    "landmark line missing a column": (
        "ijbc_name_5pts_score.txt", 3, lambda s: s.rsplit(" ", 1)[0],
        r"ijbc_name_5pts_score.txt, line 3: expected 12 whitespace-separated columns .* found 11"),
    "landmark not finite, after a blank line": (
        "ijbc_name_5pts_score.txt", 2, lambda s: ["", s.replace(s.split()[3], "nan", 1)],
        r"ijbc_name_5pts_score.txt, line 3: column 'x2' must be a finite number, found 'nan'"),
    "coinciding landmarks": (
        "ijbc_name_5pts_score.txt", 4, lambda s: " ".join([s.split()[0]] + ["50"] * 10 + ["0.9"]),
        r"ijbc_name_5pts_score.txt, line 4: the 5 landmarks coincide"),
    "landmark file in another order": (
        "ijbc_name_5pts_score.txt", 1, lambda s: s.replace("1.jpg", "2.jpg", 1),
        r"ijbc_name_5pts_score.txt, line 1: image '2.jpg' where ijbc_face_tid_mid.txt has '1.jpg'"),
    "template id not a number, after a blank line": (
        "ijbc_face_tid_mid.txt", 4, lambda s: ["", s.replace(s.split()[1], "abc")],
        r"ijbc_face_tid_mid.txt, line 5: column 'template' must be an integer, found 'abc'"),
    "image listed twice": (
        "ijbc_face_tid_mid.txt", 2, lambda s: s.replace("2.jpg", "1.jpg"),
        r"ijbc_face_tid_mid.txt, line 2: image 1.jpg is listed a second time"),
    "pair with an unknown template": (
        "ijbc_template_pair_label.txt", 2, lambda s: f"{s.split()[0]} 99999 {s.split()[2]}",
        r"ijbc_template_pair_label.txt, line 2: template 99999 \(template2\) has no image in ijbc_face_tid_mid"),
    "pair label 2": (
        "ijbc_template_pair_label.txt", 3, lambda s: s[:-1] + "2",
        r"ijbc_template_pair_label.txt, line 3: the label must be 0 or 1, found 2"),
    "probe template without images": (
        "ijbc_1N_probe_mixed.csv", 3, lambda s: "77777" + s[s.index(","):],
        r"ijbc_1N_probe_mixed.csv, line 3: template 77777 \(TEMPLATE_ID\) has no image"),
    "gallery template with two subjects": (
        "ijbc_1N_gallery_G1.csv", 3, lambda s: s.replace(",100,", ",555,"),
        r"ijbc_1N_gallery_G1.csv, line 3: template 3 has subject 555 here but subject 100 in "
        r"ijbc_1N_gallery_G1.csv, line 2"),
    "gallery row missing columns": (
        "ijbc_1N_gallery_G2.csv", 2, lambda s: ",".join(s.split(",")[:2]),
        r"ijbc_1N_gallery_G2.csv, line 2: expected 4 comma-separated columns .* found 2"),
}


@pytest.mark.parametrize("case", list(IJB_CASES))
def test_ijbc_corrupted_meta_file_one_line_before_any_embedding(case, data, tmp_path, capsys, nothing_embedded):
    file_name, line, change, expected = IJB_CASES[case]
    shutil.copytree(data["ijbc"].root / "IJBC", tmp_path / "IJBC")
    edit_line(tmp_path / "IJBC" / "meta" / file_name, line, change)
    error = one_line_error(ijb_script, ["--data_root", tmp_path, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                       "--num_workers", "0", "--output_dir", tmp_path / "out"], capsys)
    assert str(tmp_path / "IJBC" / "meta") in error
    assert re.search(expected, error), error
    assert "release" in error                                    # what to do


def test_ijbc_one_subject_with_two_gallery_templates(data, tmp_path, capsys, nothing_embedded):
    """Open-set identification needs one template per probe subject and gallery (found before embedding)."""
    shutil.copytree(data["ijbc"].root / "IJBC", tmp_path / "IJBC")
    meta = tmp_path / "IJBC" / "meta"
    shutil.copy(tmp_path / "IJBC" / "loose_crop" / "6.jpg", tmp_path / "IJBC" / "loose_crop" / "extra.jpg")
    edit_line(meta / "ijbc_face_tid_mid.txt", 6, lambda s: [s, "extra.jpg 99 5000"])
    edit_line(meta / "ijbc_name_5pts_score.txt", 6, lambda s: [s, s.replace("6.jpg", "extra.jpg")])
    edit_line(meta / "ijbc_1N_gallery_G2.csv", 3, lambda s: [s, "99,107,img/extra.jpg,5000"])
    error = one_line_error(ijb_script, ["--data_root", tmp_path, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                        "--output_dir", tmp_path / "out"], capsys)
    assert error.startswith(f"error: {meta / 'ijbc_1N_gallery_G2.csv'}, line 4: subject 107 has a second "
                            f"template (99) in this gallery; open-set identification needs one template per "
                            f"subject and gallery")


def test_reader_reports_the_physical_line_and_accepts_good_files(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a 1 2.5\n\n  \nb 2 -3e2\n")
    table = read_whitespace_table(path, (("name", "str"), ("id", "int"), ("v", "float")))
    assert table["name"].tolist() == ["a", "b"] and table["id"].tolist() == [1, 2]
    assert table["v"].tolist() == [2.5, -300.0]
    path.write_text("a 1 2.5\n\n  \nb 2 inf\n")
    with pytest.raises(MetaFileError, match=r"t.txt, line 4: column 'v' must be a finite number, found 'inf'"):
        read_whitespace_table(path, (("name", "str"), ("id", "int"), ("v", "float")))


# ------------------------------------------------------------------------------------------------
# TinyFace
# ------------------------------------------------------------------------------------------------
def _tinyface_copy(data, tmp_path):
    shutil.copytree(data["tinyface"].root, tmp_path / "root")
    return tmp_path / "root", tmp_path / "root" / TINYFACE_ALIGNED_DIR


def test_tinyface_probe_identities_without_gallery_match(data, tmp_path, capsys, nothing_embedded):
    root, aligned = _tinyface_copy(data, tmp_path)
    for folder in (root / "tinyface" / "Testing_Set" / "Gallery_Match", aligned / "Gallery_Match"):
        for path in list(folder.iterdir()):
            path.rename(path.with_name("90" + path.name))            # identities 901, 902: nobody's probes
    error = one_line_error(tinyface_script, ["--data_root", root, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                             "--output_dir", tmp_path / "out"], capsys)
    assert error.startswith(f"error: {root / 'tinyface' / 'Testing_Set'}: no identity of Probe has an image in "
                            f"Gallery_Match")


def test_tinyface_bad_identity_says_what_to_do(data, tmp_path, capsys, nothing_embedded):
    root, aligned = _tinyface_copy(data, tmp_path)
    for folder in (root / "tinyface" / "Testing_Set" / "Probe", aligned / "Probe"):
        (folder / "1_1.jpg").rename(folder / "x_1.jpg")
    error = one_line_error(tinyface_script, ["--data_root", root, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                             "--output_dir", tmp_path / "out"], capsys)
    assert "Probe/x_1.jpg: the identity" in error and "found 'x'; rename or remove the file" in error


def test_tinyface_unaligned_image_size_before_the_model(data, tmp_path, capsys, nothing_embedded):
    root, aligned = _tinyface_copy(data, tmp_path)
    first = sorted((aligned / "Probe").iterdir())[0]
    cv2.imwrite(str(first), np.full((40, 30, 3), 128, np.uint8))
    error = one_line_error(tinyface_script, ["--data_root", root, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                             "--output_dir", tmp_path / "out"], capsys)
    assert error == (f"error: {first}: expected an aligned 112x112 RGB face image, got an array of shape "
                     f"(40, 30, 3)")


# ------------------------------------------------------------------------------------------------
# IJB-S
# ------------------------------------------------------------------------------------------------
IJBS_CASES = {
    "metadata subject not a number (a still's line)": (
        "cs6_metadata.csv", 2, lambda s: "abc" + s[s.index(","):],
        r"cs6_metadata.csv, line 2: the subject id must be an integer, found 'abc'"),
    "probe video not in the metadata": (
        "cs6_surveillance_to_surveillance_probe.csv", 3, lambda s: "videos/424242.mp4",
        r"cs6_surveillance_to_surveillance_probe.csv, line 3: probe video 'videos/424242.mp4' is not a video "
        r"of cs6_metadata.csv"),
    "surveillance gallery video not in the metadata": (
        "galleries/cs6_surveillance_to_surveillance_g2.csv", 2, lambda s: s.rsplit(",", 1)[0] + ",videos/1.mp4",
        r"cs6_surveillance_to_surveillance_g2.csv, line 2: \(subject \d+, video 'videos/1.mp4'\) is not in "
        r"cs6_metadata.csv"),
    "single gallery lists a video": (
        "galleries/cs6_surveillance_to_single_g1.csv", 2, lambda s: s.rsplit(",", 1)[0] + ",videos/5001.mp4",
        r"cs6_surveillance_to_single_g1.csv, line 2: expected a file name like img/<id>.jpg, found 'videos/5001.mp4'"),
    "probed subject twice in a gallery": (
        "galleries/cs6_surveillance_to_single_g1.csv", 2, lambda s: [s, s.replace("img/", "img/9")],
        r"cs6_surveillance_to_single_g1.csv, line 3: subject 1 has a second template in this gallery"),
}


@pytest.mark.parametrize("case", list(IJBS_CASES))
def test_ijbs_corrupted_protocol_one_line_before_any_embedding(case, data, tmp_path, capsys, nothing_embedded):
    file_name, line, change, expected = IJBS_CASES[case]
    shutil.copytree(data["ijbs"].root / "protocols", tmp_path / "protocols")
    (tmp_path / "aligned").symlink_to(data["ijbs"].root / "aligned")
    edit_line(tmp_path / "protocols" / file_name, line, change)
    error = one_line_error(ijbs_script, ["--data_root", tmp_path, "--ckpt_path", data["ckpt"], "--device", "cpu",
                                         "--num_workers", "0", "--output_dir", tmp_path / "out"], capsys)
    assert re.search(expected, error), error
    assert "release" in error


# ------------------------------------------------------------------------------------------------
# audited options
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lfw_bin(tmp_path_factory):
    out = generate_demo_data(tmp_path_factory.mktemp("hq"), num_train_ids=1, imgs_per_id=1, num_val_ids=4,
                             pairs_per_set=4, set_names=("lfw",), make_memfiles=False, make_image_folder=False,
                             show_progress=False)
    return out["bins"]["lfw"]


def _hq_root(lfw_bin, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(lfw_bin, root / "lfw.bin")
    return root


def test_5valsets_unwritable_output_dir_before_any_embedding(lfw_bin, data, tmp_path, capsys, nothing_embedded):
    root = _hq_root(lfw_bin, tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    error = one_line_error(hq_script, ["--data_root", root, "--val_data_path", ".", "--set_names", "lfw",
                                       "--nrof_folds", "2", "--ckpt_path", data["ckpt"], "--device", "cpu",
                                       "--output_dir", blocker], capsys)
    assert error == (f"error: --output_dir {blocker}: cannot write results there (a file of that name exists); "
                     f"choose a writable folder with --output_dir")


def test_5valsets_too_few_pairs_for_the_folds_before_any_embedding(lfw_bin, data, tmp_path, capsys,
                                                                   nothing_embedded):
    root = _hq_root(lfw_bin, tmp_path)
    error = one_line_error(hq_script, ["--data_root", root, "--val_data_path", ".", "--set_names", "lfw",
                                       "--ckpt_path", data["ckpt"], "--device", "cpu",
                                       "--output_dir", tmp_path / "out"], capsys)
    assert error == "error: lfw (4 pairs): fewer pairs than --nrof_folds 10; use a smaller --nrof_folds"
    assert not (tmp_path / "out" / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_5valsets_cuda_without_cuda_before_converting_anything(lfw_bin, data, tmp_path, capsys):
    root = _hq_root(lfw_bin, tmp_path)
    error = one_line_error(hq_script, ["--data_root", root, "--val_data_path", ".", "--set_names", "lfw",
                                       "--ckpt_path", data["ckpt"], "--device", "cuda",
                                       "--output_dir", tmp_path / "out"], capsys)
    assert "--device cuda: CUDA is not available" in error and error.endswith("use --device cpu")
    assert sorted(p.name for p in root.iterdir()) == ["lfw.bin"]          # no memfile written first


def test_features_path_that_is_not_a_features_file(data, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("image template media\n")
    error = one_line_error(ijb_script, ["--data_root", data["ijbc"].root, "--features_path", text,
                                        "--output_dir", tmp_path / "out"], capsys)
    assert error == (f"error: {text}: not a features file (an .npz written by --save_features); give the "
                     f"features.npz of an earlier run to --features_path")


def test_batch_size_zero_is_a_usage_error_before_the_model(data, capsys, nothing_embedded):
    with pytest.raises(SystemExit) as info:
        tinyface_script.main(["--data_root", str(data["tinyface"].root), "--ckpt_path", str(data["ckpt"]),
                              "--device", "cpu", "--batch_size", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(": error: argument --batch_size: must be at least 1, "
                                                             "got 0")
