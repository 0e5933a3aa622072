"""utils.cli: user errors end as one stderr line and an exit status; bugs keep their traceback."""
import subprocess
import sys

import pytest

from utils.cli import report_error, run_cli


def test_user_errors_become_one_line_and_the_status(capsys):
    def missing(argv):
        raise FileNotFoundError(f"{argv[0]}: not found")
    assert run_cli(missing, ["x.rec"], status=1, prog="convert.py") == 1
    assert capsys.readouterr().err == "convert.py: error: x.rec: not found\n"
    assert run_cli(lambda argv: None, []) == 0

    def bug(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        run_cli(bug, [], errors=(ValueError,))
    report_error("plain")
    assert capsys.readouterr().err == "error: plain\n"


def test_align_tool_reports_a_missing_folder_without_traceback(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "face_alignment.align", str(tmp_path / "missing"),
                           str(tmp_path / "out")], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: image folder not found: {tmp_path / 'missing'}" in proc.stderr


def test_every_project_error_class_is_a_user_error():
    """Each error class the project defines is reported as one line by every entry point."""
    import importlib
    import inspect
    from utils.cli import USER_ERRORS
    modules = ["data", "train_val", "convert", "utils.checkpoint", "utils.pretrained", "utils.image",
               "utils.pairsets", "utils.recordio", "utils.onnx_export", "utils.eval_common"]
    found = []
    for name in modules:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException):
                found.append(cls_name)
                assert issubclass(cls, USER_ERRORS), f"{name}.{cls_name} is not in utils.cli.USER_ERRORS"
    assert {"CheckpointError", "RecordIOError", "TrainDataError", "ConvertError"} <= set(found)
    assert run_cli(lambda argv: (_ for _ in ()).throw(PermissionError("/x: permission denied")), []) == 2


def test_an_error_raised_in_a_dataloader_worker_is_reported_by_its_own_message(capsys):
    """Worker errors come back wrapped in the worker's traceback; the user sees only the message."""
    import torch
    from torch.utils.data import DataLoader, Dataset
    from utils.recordio import RecordIOError

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise RecordIOError("/data/train.rec: record 1 is truncated")

    def run(argv):
        for _ in DataLoader(Broken(), num_workers=1):
            pass
    torch.manual_seed(0)
    assert run_cli(run, []) == 2
    assert capsys.readouterr().err == "error: /data/train.rec: record 1 is truncated\n"
