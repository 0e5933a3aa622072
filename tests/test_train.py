"""Training: main.py end to end on tiny generated data, resume, DDP, checkpoints, optimiser."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_module
import net
import train_val
from utils.checkpoint import load_backbone_weights, read_checkpoint, save_lightning_style_checkpoint
from utils.config import get_args
from utils.demo_data import generate_demo_data

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_data(root, seed=3, num_train_ids=6, imgs_per_id=5, num_val_ids=6, pairs_per_set=10,
                       show_progress=False)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list:
    return ["--data_root", str(data), "--train_data_path", ".", "--val_data_path", ".", "--gpus", "0",
            "--arch", "ir_tiny", "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out),
            "--epochs", "1", "--seed", "7", *extra]


def _metrics(out: Path) -> dict:
    """Last logged value of every metric in the CSV logger's file."""
    files = sorted(out.glob("result/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {out}"
    values: dict = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None):
                    values[key] = float(value)
    return values


@pytest.mark.parametrize("head", ["adaface", "arcface", "cosface"])
def test_fast_dev_run_each_head(tiny_data, tmp_path, head, capsys):
    rc = main_module.main(_argv(tiny_data, tmp_path / "run", "--fast_dev_run", "--head", head))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verification accuracy" in printed and "AGEDB" in printed


def test_train_one_epoch_writes_published_checkpoint_layout(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert main_module.main(_argv(tiny_data, out, "--m", "0.4", "--h", "0.333")) == 0
    ckpt = read_checkpoint(out / "last.ckpt")
    state = ckpt["state_dict"]
    backbone_keys = list(net.build_model("ir_tiny").state_dict())
    assert [k for k in state if k.startswith("model.")] == ["model." + k for k in backbone_keys]
    assert [k for k in state if k.startswith("head.")] == ["head.kernel", "head.t", "head.batch_mean",
                                                          "head.batch_std"]
    assert state["head.kernel"].shape == (512, 6)
    assert float(state["head.batch_mean"]) != 20.0  # the running statistics were trained
    hp = ckpt["hyper_parameters"]
    assert hp["arch"] == "ir_tiny" and hp["head"] == "adaface" and hp["m"] == 0.4
    # the one loader reads it strictly into a fresh backbone
    model = net.build_model("ir_tiny")
    load_backbone_weights(model, ckpt, strict=True, source=str(out / "last.ckpt"))
    torch.testing.assert_close(model.state_dict()["output_layer.3.weight"],
                               state["model.output_layer.3.weight"])
    metrics = _metrics(out)
    for name in ("agedb_30", "cfp_fp", "lfw", "cplfw", "calfw"):
        assert 0.0 <= metrics[f"{name}_val_acc"] <= 1.0
        assert metrics[f"{name}_num_val_samples"] == 20.0
    assert "val_acc" in metrics and "train_loss_epoch" in metrics and "lr_epoch" in metrics
    assert any(p.name.startswith("epoch=") for p in out.glob("*.ckpt"))  # best by val_acc


class _StateProbe(train_val.pl.Callback):
    """Records the step and optimiser state when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_epoch = trainer.current_epoch
        opt = trainer.optimizers[0]
        self.momentum = {i: s["momentum_buffer"].clone() for i, s in enumerate(opt.state.values())
                         if s.get("momentum_buffer") is not None}
        self.lr = opt.param_groups[0]["lr"]
        self.batch_mean = pl_module.head.batch_mean.clone()

    def on_train_end(self, trainer, pl_module):
        self.end_step = trainer.global_step


def _fit(args, resume=None):
    import data
    args.total_batch_size = args.batch_size
    dm = data.DataModule.from_args(args, seed=args.seed)
    module = main_module.build_module(args, dm)
    probe = _StateProbe()
    ckpt_cb = main_module.ModelCheckpoint(dirpath=args.output_dir, save_last=True, monitor="val_acc",
                                          mode="max")
    trainer = main_module.build_trainer(args, [probe, ckpt_cb], main_module.build_loggers(args))
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    return probe


def test_resume_continues_at_the_right_step_with_the_same_optimiser_state(tiny_data, tmp_path):
    out = tmp_path / "run"
    # 30 images at batch 8 -> 3 full batches per epoch (the last partial batch is dropped)
    first = _fit(get_args(_argv(tiny_data, out, "--lr_milestones", "1", "--lr", "0.05")))
    assert first.end_step == 3
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = _fit(get_args(_argv(tiny_data, out, "--lr_milestones", "1", "--lr", "0.05",
                                  "--epochs", "2")), resume=str(out / "last.ckpt"))
    # with <= 4 epochs the published schedule validates (and checkpoints) 10 times per epoch, so
    # last.ckpt may be a mid-epoch state: training must continue exactly from there
    assert resumed.start_step == ckpt["global_step"] and resumed.start_epoch == ckpt["epoch"]
    assert resumed.end_step == 6
    saved = ckpt["optimizer_states"][0]["state"]
    assert len(resumed.momentum) == len(saved) > 0
    for i, state in saved.items():
        torch.testing.assert_close(resumed.momentum[i], state["momentum_buffer"], rtol=0, atol=0)
    assert resumed.lr == pytest.approx(ckpt["lr_schedulers"][0]["_last_lr"][0])
    torch.testing.assert_close(resumed.batch_mean, ckpt["state_dict"]["head.batch_mean"])


def test_optimiser_groups_exclude_batchnorm_from_weight_decay():
    module = train_val.Trainer(arch="ir_tiny", head="adaface", class_num=10, m=0.4, h=0.333, s=64.,
                               t_alpha=0.01, lr=0.1, momentum=0.9, weight_decay=5e-4,
                               lr_milestones=[8], lr_gamma=0.1)
    [optimizer], [scheduler] = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    bn_params = {id(p) for m in module.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
    assert ids(no_decay) == bn_params
    assert id(module.head.kernel) in ids(decay)
    prelu = next(m for m in module.model.modules() if isinstance(m, torch.nn.PReLU))
    assert id(prelu.weight) in ids(decay)
    assert ids(decay) | ids(no_decay) == {id(p) for p in module.parameters()}
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert scheduler.milestones == {8: 1} and scheduler.gamma == 0.1


def test_evaluate_a_published_format_checkpoint(tiny_data, tmp_path, capsys):
    model = net.build_model("ir_tiny")
    path = save_lightning_style_checkpoint(tmp_path / "published.ckpt", model,
                                           hyper_parameters={"arch": "ir_tiny"})
    rc = main_module.main(_argv(tiny_data, tmp_path / "eval", "--evaluate",
                                "--start_from_model_statedict", str(path)))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "evaluation (verification accuracy, %)" in printed
    for column in ("LFW", "CFPFP", "CPLFW", "CALFW", "AGEDB", "AVG"):
        assert column in printed


def test_gather_outputs_drops_sampler_padding_duplicates():
    module = train_val.Trainer(arch="ir_tiny", head="cosface", class_num=4, m=0.4, h=0.0, s=64.,
                               t_alpha=0.01, lr=0.1, momentum=0.9, weight_decay=5e-4,
                               lr_milestones=[8], lr_gamma=0.1)
    feats = torch.randn(6, 512)
    index = torch.tensor([4, 0, 2, 1, 3, 0])  # image 0 twice, as a padded distributed sampler does
    module._outputs = [{"output": feats, "norm": torch.ones(6, 1), "target": torch.zeros(6, dtype=torch.long),
                        "dataname": torch.zeros(6, dtype=torch.long), "image_index": index}]
    out = module.gather_outputs()
    assert out["image_index"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.from_numpy(out["output"][0]), feats[1])


def test_seed_readme_command_parses():
    argv = ("--data_root /data --train_data_path faces_emore/imgs --val_data_path faces_emore "
            "--train_data_subset --prefix run_ir18_ms1mv2_subset --gpus 2 --use_16bit --batch_size 512 "
            "--num_workers 16 --epochs 26 --lr_milestones 12,20,24 --head adaface --m 0.4 --h 0.333 "
            "--low_res_augmentation_prob 0.2 --crop_augmentation_prob 0.2 "
            "--photometric_augmentation_prob 0.2").split()
    args = get_args(argv)
    assert args.precision == "16-mixed" and args.gpus == 2 and args.batch_size == 512
    assert args.lr_milestones == [12, 20, 24] and args.epochs == 26 and args.train_data_subset
    assert args.head == "adaface" and args.m == 0.4 and args.h == 0.333 and args.s == 64.0
    assert args.t_alpha == 0.01 and args.lr == 0.1 and args.weight_decay == 5e-4
    assert args.low_res_augmentation_prob == 0.2 and args.arch == "ir_18"
    assert os.path.basename(args.output_dir).startswith("run_ir18_ms1mv2_subset_")


def test_gpus_without_cuda_is_a_clear_error(tiny_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = _argv(tiny_data, tmp_path / "x", "--fast_dev_run")
    argv[argv.index("--gpus") + 1] = "1"
    assert main_module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpus 1 asked for GPUs but CUDA is not available")


def test_non_finite_loss_stops_with_a_clear_message(tiny_data, tmp_path, capsys):
    rc = main_module.main(_argv(tiny_data, tmp_path / "nan", "--lr", "1e30", "--epochs", "3"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "training loss is not finite" in err and "global step" in err


def test_ddp_two_cpu_processes_gives_the_same_validation_numbers(tiny_data, tmp_path):
    model = net.build_model("ir_tiny")
    path = save_lightning_style_checkpoint(tmp_path / "w.ckpt", model, hyper_parameters={"arch": "ir_tiny"})
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"eval{procs}"
        cmd = [sys.executable, str(REPO / "main.py"), *_argv(tiny_data, out, "--evaluate",
               "--start_from_model_statedict", str(path), "--cpu_processes", str(procs))]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        if procs == 2:  # really two processes, over gloo
            log = proc.stdout + proc.stderr
            assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "gloo" in log, log[-3000:]
        results[procs] = _metrics(out)
    keys = [k for k in results[1] if k.endswith("test_acc") or k.endswith("_num_test_samples")]
    assert len(keys) == 11
    for key in keys:
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-6), key


def test_a_failed_run_leaves_no_experiment_folder(tiny_data, tmp_path, capsys):
    """Bad input found after the output folder was made (here: a pair set that is not a pair set)
    ends in one error line, and the folder this run created is removed."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.rmtree(data / "lfw")
    (data / "lfw_list.npy").unlink()
    (data / "lfw.bin").write_bytes(b"not a pickle\n")
    out = tmp_path / "run"
    assert main_module.main(_argv(data, out, "--fast_dev_run")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(data / "lfw.bin") in err[0]
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main_module.main(_argv(data, existing, "--fast_dev_run")) == 2
    assert existing.is_dir()  # a folder the run did not create is left alone


def _break_training_data(data: Path, case: str) -> list:
    """Damage a copy of the tiny data set as a user's data can be damaged; the extra flags."""
    if case == "missing_idx":
        (data / "train.idx").unlink()
        return ["--use_mxrecord"]
    if case == "truncated_rec":
        rec = data / "train.rec"
        with open(rec, "r+b") as f:
            f.truncate(rec.stat().st_size // 2)
        return ["--use_mxrecord"]
    if case == "corrupt_jpeg":
        first = sorted((data / "imgs" / "0").iterdir())[0]
        first.write_bytes(first.read_bytes()[:100])
        return []
    if case == "empty_identity":
        (data / "imgs" / "99").mkdir()
        return []
    raise ValueError(case)


@pytest.mark.parametrize("case, expected", [
    ("missing_idx", "train.idx: index file of"),
    ("truncated_rec", "train.rec: key"),
    ("corrupt_jpeg", "not a decodable image"),
    ("empty_identity", "identity folder(s) without images"),
])
def test_bad_training_data_is_one_error_line_from_main(tiny_data, tmp_path, capsys, case, expected):
    """main.py reports damaged training data as one 'error:' line naming the file (exit status 2),
    not as a traceback, and leaves no experiment folder."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for cache in data.glob("train.labels.npz"):
        cache.unlink()
    extra = _break_training_data(data, case)
    out = tmp_path / "run"
    assert main_module.main(_argv(data, out, "--fast_dev_run", *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and str(data) in lines[0], err[-2000:]
    assert not out.exists()
