"""Train (or evaluate) a face recogniser: ``python main.py --help``; ``python main.py --demo``."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

import data
import train_val
from utils.checkpoint import check_checkpoint_flags, check_resume_classes
from utils.checkpoint_io import SafeCheckpointIO
from utils.cli import run_cli
from utils.config import ConfigError, get_args
from utils.files import remove_temporaries
from utils.host_memory import keep_freed_host_memory
from utils.report import results_summary
from utils.resume import EpochEndCheckpoint, StepCheckpoint

logger = logging.getLogger("main")


def devices_per_node(args) -> int:
    return args.gpus if args.gpus > 0 else max(1, args.cpu_processes)


def build_module(args, data_module: data.DataModule) -> train_val.Trainer:
    """The LightningModule of the parsed flags: as many classes as the training data has (or
    ``--custom_num_class``), and the names of its validation sets."""
    hparams = dict(vars(args))
    hparams["class_num"] = (args.custom_num_class if args.custom_num_class != -1
                            else data_module.num_classes)
    hparams["val_set_names"] = list(data_module.val_set_names)
    if args.resume_from_checkpoint and args.custom_num_class == -1:  # known only now, before any folder
        check_resume_classes(args.resume_from_checkpoint, hparams["class_num"],
                             trust=getattr(args, "trust_checkpoint", False))
    return train_val.Trainer(**hparams)


def build_seeded(args) -> Tuple[data.DataModule, train_val.Trainer]:
    """Seed with ``--seed`` and build the DataModule and the LightningModule, in the order of
    ``--seed_order``: seeding first (the initial weights follow ``--seed``) or, as the published
    ``main.py``, after building (the initial weights then come from whatever state torch's
    generator is in: a random seed per process)."""
    if getattr(args, "seed_order", "before_model") != "published":
        pl.seed_everything(args.seed, workers=True)
    data_module = data.DataModule.from_args(args, seed=args.seed)
    module = build_module(args, data_module)
    if getattr(args, "seed_order", "before_model") == "published":
        pl.seed_everything(args.seed, workers=True)
    return data_module, module


def build_loggers(args) -> List:
    loggers: List = [CSVLogger(save_dir=args.output_dir, name="result")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401
        loggers.append(TensorBoardLogger(save_dir=args.output_dir, name="tensorboard"))
    except ImportError:
        pass
    if args.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--use_wandb needs the wandb package: pip install wandb")
        from pytorch_lightning.loggers import WandbLogger
        loggers.append(WandbLogger(save_dir=args.output_dir, name=os.path.basename(args.output_dir),
                                   project="adaface_face_recognition"))
    return loggers


def build_checkpoint_callbacks(args) -> List:
    """The best checkpoint by ``val_acc`` (first: the others save its updated state), then
    ``last_step.ckpt`` every ``--save_every_n_steps`` steps, then ``last.ckpt`` at every epoch end
    (``utils.resume``)."""
    callbacks: List = [ModelCheckpoint(dirpath=args.output_dir, monitor="val_acc", mode="max",
                                       save_top_k=args.epochs + 1 if args.save_all_models else 1)]
    if getattr(args, "save_every_n_steps", 0):
        callbacks.append(StepCheckpoint(args.output_dir, args.save_every_n_steps))
    callbacks.append(EpochEndCheckpoint(args.output_dir))
    return callbacks


def build_trainer(args, callbacks: Sequence, loggers: Sequence) -> pl.Trainer:
    """The ``pl.Trainer`` of the published run, on Lightning 2 (CPU, one GPU, DDP, multi-node)."""
    if args.gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"--gpus {args.gpus} asked for GPUs but CUDA is not available here; "
                         f"use --gpus 0 to train on the CPU")
    if args.gpus == 0 and args.precision == "16-mixed":
        raise ConfigError("--precision 16-mixed (--use_16bit) needs a GPU; on the CPU use bf16-mixed or 32")
    world = devices_per_node(args) * args.num_nodes
    strategy = "ddp" if world > 1 else "auto"
    return pl.Trainer(
        default_root_dir=args.output_dir,
        logger=list(loggers),
        accelerator="cpu" if args.gpus == 0 else "gpu",
        devices=devices_per_node(args),
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_epochs=args.epochs,
        precision=args.precision,
        fast_dev_run=args.fast_dev_run,
        callbacks=list(callbacks),
        num_sanity_val_steps=getattr(args, "num_sanity_val_steps", 16 if args.batch_size > 63 else 100),
        val_check_interval=1.0 if args.epochs > 4 else 0.1,
        accumulate_grad_batches=args.accumulate_grad_batches,
        limit_train_batches=50 if args.test_run else 1.0,
        log_every_n_steps=getattr(args, "log_every_n_steps", 50),
        plugins=[SafeCheckpointIO(trust=getattr(args, "trust_checkpoint", False),
                                  mmap=bool(getattr(args, "partial_fc", False)))],
        gradient_clip_val=getattr(args, "gradient_clip_val", 0.0) or None,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: 0 on success; 2 on bad input or when training stopped on a
    non-finite loss (one ``error: ...`` line, :func:`utils.cli.run_cli`)."""
    created: List[str] = []
    status = 1
    try:
        status = run_cli(lambda a: _run(a, created), argv)
    finally:
        if status and created:
            remove_failed_output(created[0])
    return status


def remove_failed_output(folder: str) -> None:
    """Remove the experiment folder that a failed run created, unless it holds a checkpoint (a run
    stopped on a non-finite loss keeps its last good one). Only the global-rank-0 process removes."""
    ranks = (os.environ.get(name, "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))
    if any(rank != "0" for rank in ranks) or not os.path.isdir(folder):
        return
    if any(name.endswith(".ckpt") for _, _, names in os.walk(folder) for name in names):
        return
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("removed %s, which this failed run created", folder)


def _run(argv: Optional[Sequence[str]], created: Optional[List[str]] = None) -> None:
    args = get_args(argv)
    check_checkpoint_flags(args)  # before any data is read or folder created
    if created is not None and not os.path.exists(args.output_dir):
        created.append(args.output_dir)
    if args.demo:
        from utils.demo import prepare_demo_data
        prepare_demo_data(args)

    world = devices_per_node(args) * args.num_nodes
    if args.batch_size % world:
        raise ConfigError(f"--batch_size {args.batch_size} (the total batch) is not divisible by the "
                          f"{world} training processes")
    args.total_batch_size = args.batch_size
    args.batch_size = args.batch_size // world
    if world > 1 and args.gpus > 0:
        torch.set_num_threads(1)
    if args.keep_host_memory and args.gpus == 0:
        keep_freed_host_memory()   # before the first large allocation; the loader workers inherit it
    data_module, module = build_seeded(args)

    callbacks = build_checkpoint_callbacks(args)
    checkpoint = callbacks[0]
    trainer = build_trainer(args, callbacks, build_loggers(args))
    if trainer.is_global_zero:
        logger.info("output folder: %s", args.output_dir)
        # what a killed checkpoint save left (the sharded head's gather files, a partial .ckpt)
        for folder in {args.output_dir, os.path.dirname(args.resume_from_checkpoint or "") or args.output_dir}:
            remove_temporaries(folder)

    if args.evaluate:
        trainer.test(module, datamodule=data_module)
    else:
        trainer.fit(module, datamodule=data_module, ckpt_path=args.resume_from_checkpoint or None)
        best = checkpoint.best_model_path
        trainer.test(module, datamodule=data_module, ckpt_path=best if best else None)
    if trainer.is_global_zero:
        title = "evaluation" if args.evaluate else f"test of {checkpoint.best_model_path or 'the final model'}"
        print(results_summary(module.last_results, module.val_set_names, stage="test", title=title))
        if args.demo:
            from utils.demo import report_demo
            print(report_demo(args, module))


if __name__ == "__main__":
    sys.exit(main())
