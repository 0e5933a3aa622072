"""Safe checkpoint loading on every path, and main.py's early check of its checkpoint flags.

A malicious checkpoint (its pickle would create a marker file when unpickled) must be refused by
every entry point that reads checkpoints, before any of it runs; real checkpoints (ours, and ones
shaped like the published pytorch-lightning 1.x files) must load with the safe loader, and a
trusted file (``--trust_checkpoint`` / ``trust=True``) with the full one.
"""
from __future__ import annotations

import argparse
import collections
import io
import logging
import pickle
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

import inference
import main as main_module
import net
import utils.eval_common as eval_common
from utils.checkpoint import (UntrustedCheckpointError, architecture_of, check_checkpoint_flags,
                              guess_architecture, load_pretrained_backbone, read_checkpoint,
                              save_lightning_style_checkpoint)
from utils.checkpoint_io import SafeCheckpointIO
from tests.scripts import load_script
from utils.cli import run_cli
from utils.config import get_args
from utils.demo_data import generate_demo_data

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickles by calling ``exec``: what a malicious checkpoint does (here: create a marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety_data")
    generate_demo_data(root, seed=3, num_train_ids=6, imgs_per_id=5, num_val_ids=6, pairs_per_set=10,
                       show_progress=False)
    return root


def _argv(data: Path, *extra: str) -> list:
    return ["--data_root", str(data), "--train_data_path", ".", "--val_data_path", ".", "--gpus", "0",
            "--arch", "ir_tiny", "--batch_size", "8", "--num_workers", "0", "--epochs", "1",
            "--seed", "7", *extra]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A real checkpoint of main.py's LightningModule after 2 training steps, written by Lightning
    with ModelCheckpoint's state (no validation, to keep it quick)."""
    import data
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    out = tmp_path_factory.mktemp("safety_run") / "run"
    args = get_args(_argv(tiny_data, "--output_dir", str(out)))
    args.total_batch_size = args.batch_size
    data_module = data.DataModule.from_args(args, seed=args.seed)
    module = main_module.build_module(args, data_module)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, callbacks=[ModelCheckpoint(dirpath=out)], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, datamodule=data_module)
    trainer.save_checkpoint(out / "last.ckpt")
    return out / "last.ckpt"


@pytest.fixture(scope="module")
def evil(trained, tmp_path_factory):
    """A Lightning checkpoint, complete and resumable, whose training arguments hold the payload."""
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "MARKER"
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = _Payload(marker)
    path = folder / "evil.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def _one_line_refusal(capsys, path: Path) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    line = lines[0]
    assert line.startswith("error: ") and str(path) in line
    assert "builtins.exec" in line and "--trust_checkpoint" in line
    return line


# -- the malicious checkpoint, on every loading path ------------------------------------------

def test_read_checkpoint_refuses_before_anything_runs(evil):
    path, marker = evil
    with pytest.raises(UntrustedCheckpointError, match=r"references builtins\.exec.*--trust_checkpoint"):
        read_checkpoint(path)
    with pytest.raises(UntrustedCheckpointError):
        read_checkpoint(path, mmap=True)
    assert not marker.exists()


def test_inference_cli_refuses(evil, capsys):
    path, marker = evil
    assert inference.main(["--ckpt_path", str(path), "--arch", "ir_tiny"]) == 2
    assert not marker.exists()
    _one_line_refusal(capsys, path)


@pytest.mark.parametrize("flags", [["--evaluate", "--start_from_model_statedict"],
                                   ["--start_from_model_statedict"],
                                   ["--resume_from_checkpoint"]],
                         ids=["evaluate", "start_from_model_statedict", "resume"])
def test_main_refuses_before_creating_anything(evil, tiny_data, tmp_path, capsys, flags):
    path, marker = evil
    experiments = tmp_path / "experiments"
    argv = _argv(tiny_data, "--experiments_root", str(experiments), "--prefix", "p", *flags, str(path))
    assert main_module.main(argv) == 2
    assert not marker.exists()
    line = _one_line_refusal(capsys, path)
    assert line.startswith(f"error: {flags[-1]} {path}: not loaded")
    assert not experiments.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["evil.ckpt"]  # resume's output folder


def test_lightning_resume_load_goes_through_the_safe_loader(evil, tiny_data, tmp_path, monkeypatch):
    """Lightning's own read of ``trainer.fit(ckpt_path=...)`` (main.py's trainer, without the
    early check of main._run) refuses the file too, even where torch's default is the full
    unpickler (Lightning alone would then run the payload)."""
    import data
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = evil
    args = get_args(_argv(tiny_data, "--output_dir", str(tmp_path / "out")))
    args.total_batch_size = args.batch_size
    data_module = data.DataModule.from_args(args, seed=args.seed)
    module = main_module.build_module(args, data_module)
    trainer = main_module.build_trainer(args, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    with pytest.raises(UntrustedCheckpointError, match=r"builtins\.exec"):
        trainer.fit(module, datamodule=data_module, ckpt_path=str(path))
    assert not marker.exists()


def test_eval_5valsets_refuses(evil, tiny_data, tmp_path, capsys):
    path, marker = evil
    script = load_script("validation_hq/eval_5valsets.py")
    argv = ["--data_root", str(tiny_data), "--val_data_path", ".", "--ckpt_path", str(path), "--arch",
            "ir_tiny", "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path / "out")]
    assert run_cli(script.main, argv) == 2
    assert not marker.exists()
    _one_line_refusal(capsys, path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["validation_mixed/validate_IJB_BC.py", "validation_lq/validate_tinyface.py",
                                    "validation_lq/validate_IJB_S.py"])
def test_other_evaluation_scripts_load_through_the_shared_safe_loader(evil, tmp_path, script):
    path, marker = evil
    parser = load_script(script).build_parser()
    args = parser.parse_args(["--data_root", str(tmp_path), "--ckpt_path", str(path)])
    [spec] = eval_common.model_specs_from_args(args)
    assert spec.trust is False
    with pytest.raises(UntrustedCheckpointError, match=r"builtins\.exec"):
        eval_common.load_model(spec, "cpu")
    assert not marker.exists()
    trusting = parser.parse_args(["--data_root", str(tmp_path), "--ckpt_path", str(path), "--trust_checkpoint"])
    assert eval_common.model_specs_from_args(trusting)[0].trust is True


# -- real checkpoints load safely --------------------------------------------------------------

def test_our_trained_checkpoint_loads_safely_without_warnings(trained, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        checkpoint = read_checkpoint(trained)
        model = load_pretrained_backbone(None, trained)
    assert caught == [] and caplog.records == []
    assert checkpoint["hyper_parameters"]["arch"] == "ir_tiny" and model.arch == "ir_tiny"
    assert checkpoint["lr_schedulers"][0]["milestones"] == collections.Counter({8: 1, 12: 1, 14: 1})
    torch.testing.assert_close(model.state_dict()["output_layer.3.weight"],
                               checkpoint["state_dict"]["model.output_layer.3.weight"])


def _global(path: str) -> str:
    """``module.name`` as pickle protocol 2 writes it after its GLOBAL opcode: ``module\\nname``."""
    module, _, name = path.rpartition(".")
    return f"{module}\n{name}\n"


def _save_published_style(path: Path, checkpoint: dict, renames: dict) -> None:
    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=None):
            self._out, self._buffer = file, io.BytesIO()
            super().__init__(self._buffer, protocol)

        def dump(self, obj):
            super().dump(obj)
            data = self._buffer.getvalue()
            for old, new in renames.items():
                assert b"c" + _global(old).encode() in data, old
                data = data.replace(b"c" + _global(old).encode(), b"c" + _global(new).encode())
            self._out.write(data)

    module = argparse.Namespace(Pickler=Pickler, __name__="renaming_pickle")
    torch.save(checkpoint, path, pickle_module=module)


def _published_style_checkpoint(hparams) -> dict:
    """The layout of a checkpoint written by the published AdaFace code under pytorch-lightning 1.x."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    torch.manual_seed(3)
    model = net.build_model("ir_tiny")
    state = collections.OrderedDict({f"model.{k}": v for k, v in model.state_dict().items()})
    state.update({"head.kernel": torch.randn(512, 6), "head.t": torch.zeros(1),
                  "head.batch_mean": torch.ones(1) * 20, "head.batch_std": torch.ones(1) * 100})
    return {
        "epoch": 25, "global_step": 1234, "pytorch-lightning_version": "1.4.4", "state_dict": state,
        "callbacks": {ModelCheckpoint: {"monitor": "val_acc", "best_model_score": torch.tensor(0.97),
                                        "best_model_path": "experiments/x/epoch=24.ckpt",
                                        "current_score": np.float64(0.965), "dirpath": "experiments/x"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [{"milestones": collections.Counter({12: 1, 20: 1, 24: 1}), "gamma": 0.1,
                           "last_epoch": 25, "_last_lr": [0.001]}],
        "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 5},
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "val_scores": np.array([0.96, 0.97]),
    }


@pytest.mark.parametrize("kind", ["namespace", "attribute_dict", "attribute_dict_fabric"])
def test_published_style_checkpoint_loads_safely_without_warnings(tmp_path, caplog, kind):
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict
    values = dict(arch="ir_tiny", head="adaface", m=0.4, h=0.333, lr_milestones=[12, 20, 24], use_16bit=True)
    hparams = argparse.Namespace(**values) if kind == "namespace" else AttributeDict(values)
    renames = {"numpy._core.multiarray.scalar": "numpy.core.multiarray.scalar",
               "numpy._core.multiarray._reconstruct": "numpy.core.multiarray._reconstruct"}
    if kind == "attribute_dict_fabric":
        renames[f"{AttributeDict.__module__}.AttributeDict"] = "lightning_fabric.utilities.data.AttributeDict"
    path = tmp_path / f"adaface_{kind}.ckpt"
    _save_published_style(path, _published_style_checkpoint(hparams), renames)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader alone refuses it
        torch.load(path, weights_only=True)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        checkpoint = read_checkpoint(path)
        model = load_pretrained_backbone(None, path)
    assert caught == [] and caplog.records == []
    got = checkpoint["hyper_parameters"]
    assert (vars(got) if kind == "namespace" else got) == values
    assert checkpoint["callbacks"][ModelCheckpoint]["current_score"] == np.float64(0.965)
    assert checkpoint["lr_schedulers"][0]["milestones"] == collections.Counter({12: 1, 20: 1, 24: 1})
    np.testing.assert_array_equal(checkpoint["val_scores"], [0.96, 0.97])
    assert model.arch == "ir_tiny"
    torch.testing.assert_close(model.state_dict()["output_layer.3.weight"],
                               checkpoint["state_dict"]["model.output_layer.3.weight"])


# -- trusted files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unlisted(tmp_path_factory) -> Path:
    """A harmless checkpoint whose training arguments hold a class outside the allowlist."""
    model = net.build_model("ir_tiny")
    hparams = argparse.Namespace(arch="ir_tiny", output_dir=PurePosixPath("/experiments/run1"))
    return save_lightning_style_checkpoint(tmp_path_factory.mktemp("unlisted") / "unlisted.ckpt", model,
                                           hyper_parameters=hparams)


def test_trust_loads_an_unlisted_class_in_every_api(unlisted):
    with pytest.raises(UntrustedCheckpointError, match=r"pathlib\.PurePosixPath"):
        inference.load_pretrained_model(ckpt_path=unlisted)
    assert inference.load_pretrained_model(ckpt_path=unlisted, trust=True).arch == "ir_tiny"
    spec = eval_common.ModelSpec("unlisted", unlisted, None)
    with pytest.raises(UntrustedCheckpointError):
        eval_common.load_model(spec)
    assert eval_common.load_model(spec, trust=True).arch == "ir_tiny"
    with pytest.raises(UntrustedCheckpointError):
        SafeCheckpointIO().load_checkpoint(unlisted)
    loaded = SafeCheckpointIO(trust=True).load_checkpoint(unlisted)
    assert loaded["hyper_parameters"].output_dir == PurePosixPath("/experiments/run1")


def test_trust_checkpoint_flags(unlisted, tiny_data, tmp_path):
    import train_val
    argv = _argv(tiny_data, "--output_dir", str(tmp_path / "eval"), "--evaluate",
                 "--start_from_model_statedict", str(unlisted))
    with pytest.raises(UntrustedCheckpointError, match=r"pathlib\.PurePosixPath"):
        check_checkpoint_flags(get_args(argv))
    args = get_args(argv + ["--trust_checkpoint"])
    check_checkpoint_flags(args)
    module = train_val.Trainer(**{**vars(args), "class_num": 6})  # main.py's module loads it too
    with torch.serialization.safe_globals([PurePosixPath, argparse.Namespace]):  # reference: torch's safe loader
        expected = torch.load(unlisted, weights_only=True)["state_dict"]["model.output_layer.3.weight"]
    torch.testing.assert_close(module.model.output_layer[3].weight.detach(), expected)
    assert inference._parse_args(["--trust_checkpoint"]).trust_checkpoint is True


# -- main.py checks its checkpoint flags before any work ----------------------------------------

def _bad_resume(tmp_path, tiny_data, capsys, ckpt: Path, *extra: str) -> str:
    experiments = tmp_path / "experiments"
    before = sorted(p.name for p in ckpt.parent.iterdir()) if ckpt.parent.exists() else None
    argv = _argv(tiny_data, "--experiments_root", str(experiments), "--prefix", "p",
                 "--resume_from_checkpoint", str(ckpt), *extra)
    assert main_module.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not experiments.exists()
    after = sorted(p.name for p in ckpt.parent.iterdir()) if ckpt.parent.exists() else None
    assert after == before  # nothing written beside the checkpoint (resume's output folder)
    return lines[0]


def test_resume_from_a_missing_file(tmp_path, tiny_data, capsys):
    ckpt = tmp_path / "gone" / "last.ckpt"
    line = _bad_resume(tmp_path, tiny_data, capsys, ckpt)
    assert line == f"error: --resume_from_checkpoint {ckpt}: checkpoint file not found"
    assert not ckpt.parent.exists()


def test_resume_from_a_backbone_state_dict(trained, tmp_path, tiny_data, capsys):
    ckpt = tmp_path / "backbone" / "backbone.ckpt"
    ckpt.parent.mkdir()
    torch.save(net.build_model("ir_tiny").state_dict(), ckpt)
    line = _bad_resume(tmp_path, tiny_data, capsys, ckpt)
    assert line.startswith(f"error: --resume_from_checkpoint {ckpt}: not a Lightning training checkpoint "
                           f"(it holds a bare state dict)")
    assert "--start_from_model_statedict" in line


def test_resume_with_another_architecture(trained, tmp_path, tiny_data, capsys):
    line = _bad_resume(tmp_path, tiny_data, capsys, trained, "--arch", "ir_18")
    assert line == (f"error: --resume_from_checkpoint {trained} holds ir_tiny, --arch says ir_18: "
                    f"pass --arch ir_tiny")


def test_resume_with_another_head(trained, tmp_path, tiny_data, capsys):
    line = _bad_resume(tmp_path, tiny_data, capsys, trained, "--head", "arcface")
    assert "holds a head trained with --head adaface, this run says --head arcface" in line
    line = _bad_resume(tmp_path, tiny_data, capsys, trained, "--custom_num_class", "9")
    assert line.endswith("holds a head of 6 classes, --custom_num_class says 9")


def test_resume_with_training_data_of_another_class_count(trained, tmp_path, capsys):
    """The class count of the data is known once the data is indexed: checked before the module,
    the trainer or any folder is made."""
    other = tmp_path / "other_data"
    generate_demo_data(other, seed=4, num_train_ids=5, imgs_per_id=5, num_val_ids=6, pairs_per_set=10,
                       show_progress=False)
    before = sorted(p.relative_to(trained.parent) for p in trained.parent.rglob("*"))
    assert main_module.main(_argv(other, "--resume_from_checkpoint", str(trained), "--epochs", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume_from_checkpoint {trained} holds a head of 6 classes, the training data "
                   f"has 5: resume with the training data of that run"]
    assert sorted(p.relative_to(trained.parent) for p in trained.parent.rglob("*")) == before


def test_start_from_model_statedict_of_another_architecture(trained, tiny_data, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = _argv(tiny_data, "--output_dir", str(out), "--evaluate", "--start_from_model_statedict",
                 str(trained), "--arch", "ir_50")
    assert main_module.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --start_from_model_statedict {trained} holds ir_tiny, --arch says ir_50: "
                     f"pass --arch ir_tiny"]
    assert not out.exists()


def test_checkpoint_flags_accept_a_good_resume(trained):
    args = get_args(_argv(Path("unused"), "--resume_from_checkpoint", str(trained)))
    check_checkpoint_flags(args)  # no error


def test_ir_tiny_is_recognised_from_its_keys():
    state = net.build_model("ir_tiny").state_dict()
    assert guess_architecture(state) == "ir_tiny"
    assert architecture_of({"state_dict": {f"model.{k}": v for k, v in state.items()}}) == "ir_tiny"
    assert guess_architecture(net.build_model("ir_18").state_dict()) == "ir_18"
