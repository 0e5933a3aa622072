"""The training command line: every published flag with its published default, plus our additions.

``python main.py --help`` prints all of them. Differences from the published ``config.py``:

* ``--head`` checks its value against ``adaface``, ``arcface``, ``cosface`` (the published flag had
  no ``choices``; its ``build_head`` took the same three and failed later on anything else);
* ``--weight_decay`` defaults to 5e-4 and is used: the published flag defaulted to 1e-4 but its
  training code ignored it and hard-coded 5e-4, so the default reproduces the published runs;
* ``--precision`` (32, 16-mixed, bf16-mixed; ``--use_16bit`` means 16-mixed), ``--gpus 0`` for the CPU,
  ``--num_nodes``, ``--cpu_processes``, ``--channels_last`` (on for GPU training), ``--keep_host_memory`` (on for CPU training), ``--compile``, ``--compile_mode``, ``--demo``, ``--train_data_subset_path``, ``--skip_corrupt_images``,
  ``--save_every_n_steps``, ``--output_dir``, ``--experiments_root`` and ``--trust_checkpoint`` are new;
* ``--seed_order published`` seeds after building the model, as the published ``main.py`` does
  (the initial weights then come from torch's per-process random seed, not from ``--seed``);
* ``--partial_fc``, ``--sample_rate``, ``--partial_fc_stats``, ``--partial_fc_dense_grad`` and
  ``--gradient_clip_val`` (the sharded head of ``head_sharded.py``) are new.
"""
from __future__ import annotations

import argparse
import os
from time import gmtime, strftime
from typing import List, Optional, Sequence

from head import HEAD_TYPES
from utils.compile import COMPILE_MODES
from utils.errors import UserError

PRECISIONS = ("32", "16-mixed", "bf16-mixed")


def _milestones(text: str) -> List[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr_milestones must be comma-separated epochs, got {text!r}")
    if values != sorted(values):
        raise argparse.ArgumentTypeError(f"--lr_milestones must be increasing, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``main.py``."""
    p = argparse.ArgumentParser(
        description="Train or evaluate an IResNet face recogniser with the AdaFace / ArcFace / CosFace "
                    "margin head.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_root", type=str, default="")
    data.add_argument("--train_data_path", type=str, default="faces_emore/imgs",
                      help="image folder (one sub-folder per identity) or, with --use_mxrecord, the folder "
                           "holding train.rec/train.idx; relative to --data_root")
    data.add_argument("--val_data_path", type=str, default="faces_emore",
                      help="folder with the five pair sets (memfiles or .bin), relative to --data_root")
    data.add_argument("--use_mxrecord", action="store_true", help="train directly from train.rec")
    data.add_argument("--train_data_subset", action="store_true",
                      help="train on the subset listed by --train_data_subset_path (MS1MV2 ablation)")
    data.add_argument("--train_data_subset_path", type=str,
                      default="assets/ms1mv2_train_subset_index.txt",
                      help="index file of the subset (comma/whitespace-separated sample indices, or .npy); "
                           "the published MS1MV2 one ships with the original AdaFace repository")
    data.add_argument("--swap_color_channel", action="store_true",
                      help="the training files hold red and blue swapped: swap them back after decoding, "
                           "so that the network sees true-colour BGR")
    data.add_argument("--num_workers", default=16, type=int)
    data.add_argument("--skip_corrupt_images", action="store_true",
                      help="log and skip undecodable training images instead of stopping")
    data.add_argument("--low_res_augmentation_prob", default=0.0, type=float)
    data.add_argument("--crop_augmentation_prob", default=0.0, type=float)
    data.add_argument("--photometric_augmentation_prob", default=0.0, type=float)

    run = p.add_argument_group("run")
    run.add_argument("--prefix", type=str, default="default", help="experiment name prefix")
    run.add_argument("--experiments_root", type=str, default="experiments")
    run.add_argument("--output_dir", type=str, default="",
                     help="output folder (default: <experiments_root>/<prefix>_<MM-DD>_<n>)")
    run.add_argument("--gpus", type=int, default=1, help="GPUs per node; 0 trains on the CPU")
    run.add_argument("--num_nodes", type=int, default=1, help="nodes (torchrun or SLURM launches them)")
    run.add_argument("--cpu_processes", type=int, default=1,
                     help="with --gpus 0: number of CPU processes (DDP over gloo when more than 1)")
    run.add_argument("--distributed_backend", type=str, default="ddp", choices=("dp", "ddp", "ddp2"),
                     help="published flag; Lightning 2 runs DDP whenever more than one device is used")
    run.add_argument("--use_16bit", action="store_true", help="same as --precision 16-mixed")
    run.add_argument("--precision", type=str, default=None, choices=PRECISIONS,
                     help="training precision (default 32, or 16-mixed with --use_16bit)")
    run.add_argument("--epochs", default=24, type=int)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--seed_order", default="before_model", choices=("before_model", "published"),
                     help="when --seed is applied: before building the model (initial weights "
                          "follow --seed) or, as the published main.py, after it (initial weights "
                          "are then random per process, not reproducible)")
    run.add_argument("--batch_size", default=256, type=int,
                     help="total batch size over all GPUs of all nodes")
    run.add_argument("--accumulate_grad_batches", type=int, default=1)
    run.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                     help="run the backbone in channels_last memory format; default: on for GPU "
                          "training (the layout of tensor-core convolutions; untested here), off on the "
                          "CPU, where the ir_18 / ir_50 training step measured equal or faster in NCHW "
                          "(bench/README.md)")
    run.add_argument("--keep_host_memory", action=argparse.BooleanOptionalAction, default=None,
                     help="CPU training: glibc keeps freed memory for reuse instead of returning and "
                          "re-faulting it every step (1.1-1.4x faster CPU steps; resident memory stays "
                          "at its peak, more with --partial_fc's varying block sizes; utils/host_memory.py). "
                          "Default: on for CPU training without --partial_fc; no effect on GPU training")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training forward of the backbone and head (one-time "
                          "compilation on the first step; falls back to eager with a warning on failure)")
    run.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                     help="torch.compile mode with --compile")
    run.add_argument("--fast_dev_run", action="store_true")
    run.add_argument("--test_run", action="store_true", help="50 training batches per epoch")
    run.add_argument("--evaluate", action="store_true",
                     help="only evaluate (use with --start_from_model_statedict)")
    run.add_argument("--resume_from_checkpoint", type=str, default="")
    run.add_argument("--start_from_model_statedict", type=str, default="")
    run.add_argument("--trust_checkpoint", action="store_true",
                     help="read --resume_from_checkpoint / --start_from_model_statedict with the full "
                          "unpickler, which can run code stored in the file: only for files from a source "
                          "you trust (by default anything but tensors and training arguments is refused)")
    run.add_argument("--use_wandb", action="store_true")
    run.add_argument("--save_all_models", action="store_true")
    run.add_argument("--save_every_n_steps", type=int, default=0,
                     help="also write last_step.ckpt every N optimizer steps (mid-epoch; resuming from "
                          "it continues with the next batch); last.ckpt is always the state at the end "
                          "of the last completed epoch. 0: off")
    run.add_argument("--demo", action="store_true",
                     help="generate the built-in demo data if needed and train a small model on the CPU")
    run.add_argument("--demo_dir", type=str, default="tmp/demo_data")

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--lr", default=0.1, type=float)
    optim.add_argument("--lr_milestones", default="8,12,14", type=_milestones)
    optim.add_argument("--lr_gamma", default=0.1, type=float)
    optim.add_argument("--momentum", default=0.9, type=float)
    optim.add_argument("--weight_decay", default=5e-4, type=float)

    model = p.add_argument_group("model and head")
    model.add_argument("--arch", default="ir_18")
    model.add_argument("--head", default="adaface", type=str, choices=HEAD_TYPES)
    model.add_argument("--m", default=0.5, type=float)
    model.add_argument("--h", default=0.0, type=float)
    model.add_argument("--s", type=float, default=64.0)
    model.add_argument("--t_alpha", default=0.01, type=float)
    model.add_argument("--custom_num_class", type=int, default=-1,
                       help="number of classes of the head (default: counted from the training data)")
    add_partial_fc_arguments(p)
    return p


def add_partial_fc_arguments(p: argparse.ArgumentParser) -> None:
    """``--partial_fc`` (the sharded head of ``head_sharded.py``) and its companions."""
    pfc = p.add_argument_group("sharded head (Partial FC)")
    pfc.add_argument("--partial_fc", action="store_true",
                     help="shard the head's class centres over the training processes (GPUs, nodes, "
                          "--cpu_processes) instead of replicating them: for heads too large for one "
                          "device; same losses and gradients as the replicated head")
    pfc.add_argument("--sample_rate", type=float, default=1.0,
                     help="with --partial_fc: fraction of each shard's classes in each step's softmax: "
                          "each process keeps max(ceil(r x its classes), global batch) of them, every "
                          "positive class among them; 1.0 = all classes")
    pfc.add_argument("--partial_fc_stats", default="global", choices=("global", "local"),
                     help="with --partial_fc and AdaFace: running norm statistics over the whole global "
                          "batch (global) or over each process's own batch (local, as the published DDP "
                          "training did)")
    pfc.add_argument("--partial_fc_dense_grad", action="store_true",
                     help="with --partial_fc: keep the kernel's gradient as a dense kernel.grad (E x its "
                          "classes per process; what 16-mixed does, and arcface_torch) instead of the compact "
                          "form the fused SGD step reads (utils/column_sgd.py); same updates (to float32 rounding "
                          "with --sample_rate < 1), more memory and time")
    pfc.add_argument("--gradient_clip_val", type=float, default=0.0,
                     help="clip the global gradient norm (over all shards with --partial_fc) to this "
                          "value; 0 = no clipping")


def check_partial_fc_args(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` on Partial FC flags that make no sense."""
    if not 0.0 < args.sample_rate <= 1.0:
        raise ConfigError(f"--sample_rate must lie in (0, 1], got {args.sample_rate}")
    if not args.partial_fc and (args.sample_rate != 1.0 or args.partial_fc_stats != "global"
                                or args.partial_fc_dense_grad):
        raise ConfigError("--sample_rate, --partial_fc_stats and --partial_fc_dense_grad need --partial_fc")
    if args.gradient_clip_val < 0:
        raise ConfigError(f"--gradient_clip_val must be >= 0, got {args.gradient_clip_val}")


class ConfigError(UserError, ValueError):
    """Flags that contradict each other or miss a required companion."""


def resolve_precision(args: argparse.Namespace) -> str:
    if args.precision:
        return args.precision
    return "16-mixed" if args.use_16bit else "32"


def next_output_dir(root: str, prefix: str) -> str:
    """``<root>/<prefix>_<MM-DD>_<n>`` with the first free ``n`` (as published)."""
    stamp = strftime("%m-%d", gmtime())
    n = 0
    while os.path.isdir(os.path.join(root, f"{prefix}_{stamp}_{n}")):
        n += 1
    return os.path.join(root, f"{prefix}_{stamp}_{n}")


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` and fill in the derived fields (precision, output_dir)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        from utils.demo import apply_demo_settings
        apply_demo_settings(args, parser.parse_args([]))
    args.precision = resolve_precision(args)
    if args.channels_last is None:
        args.channels_last = args.gpus > 0
    if args.keep_host_memory is None:     # the sharded head is for memory: no allocator slack there
        args.keep_host_memory = args.gpus == 0 and not args.partial_fc
    check_partial_fc_args(args)
    if args.use_16bit and args.precision != "16-mixed":
        raise ConfigError("--use_16bit contradicts --precision " + args.precision)
    if args.save_every_n_steps < 0:
        raise ConfigError(f"--save_every_n_steps must be >= 0 (0: off), got {args.save_every_n_steps}")
    if args.evaluate and not args.start_from_model_statedict:
        raise ConfigError("--evaluate needs the checkpoint to evaluate: --start_from_model_statedict X.ckpt")
    if args.resume_from_checkpoint:
        if not args.resume_from_checkpoint.endswith(".ckpt"):
            raise ConfigError(f"--resume_from_checkpoint expects a .ckpt file, got "
                             f"{args.resume_from_checkpoint}")
        args.output_dir = args.output_dir or os.path.dirname(args.resume_from_checkpoint)
    if not args.output_dir:
        args.output_dir = next_output_dir(args.experiments_root, args.prefix)
    return args
