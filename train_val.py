"""The Lightning module: backbone (``model``) + margin head (``head``), loss, validation, optimiser.

Checkpoints therefore hold ``model.*`` and ``head.*`` keys, as the published ones do, and the
training arguments as ``hyper_parameters``; also ``rng_states``, the global random generators of
every process (plain types, ``utils.seeding``), restored on resume so that dropout continues its
stream exactly.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.optim as optim
import torch.optim.lr_scheduler as lr_scheduler
from torch.nn import CrossEntropyLoss

import head as heads
import head_sharded
import net
from utils import column_sgd
from utils.checkpoint import load_backbone_weights, read_checkpoint
from utils.compile import CompiledCall
from utils.errors import UserError
from utils.evaluate_utils import evaluate_pair_set
from utils.features import embed_batch
from utils.pairsets import VAL_SET_NAMES
from utils.seeding import capture_rng_states, restore_rng_states

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


def split_parameters(module: torch.nn.Module):
    """``(decay, no_decay)``: BatchNorm parameters get no weight decay, every other leaf's do."""
    decay, no_decay = [], []
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            no_decay.extend(m.parameters())
        elif len(list(m.children())) == 0:
            decay.extend(m.parameters())
    assert len(list(module.parameters())) == len(decay) + len(no_decay)
    return decay, no_decay


def _contiguous_dropout_inputs(model: torch.nn.Module) -> None:
    """Dropout fills its mask in memory order: on a channels_last feature map the same random
    numbers would land on other elements than in NCHW. Feeding it NCHW keeps the masks, and so the
    training results, independent of ``--channels_last`` (one small copy: the B x 512 x 7 x 7 map)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.register_forward_pre_hook(_nchw_input)


def _nchw_input(_module: torch.nn.Module, inputs: tuple) -> tuple:
    """Forward pre-hook (a module-level function, so the model still pickles)."""
    return (inputs[0].contiguous(),) + inputs[1:]


class SGD(optim.SGD):
    """``torch.optim.SGD`` that adds the weight decay into the gradient in place.

    torch's step computes ``grad + weight_decay * param`` into a new tensor per parameter (one
    E x C temporary for the head's kernel; the foreach path one for every parameter of a group at
    once); this one writes it into ``param.grad`` (same operation, same values: the updates are
    exactly torch's) and runs torch's step with the decay set to 0. ``param.grad`` then holds the
    decayed gradient after the step. Groups with ``maximize``, ``differentiable``, a tensor weight
    decay or sparse gradients fall back to torch's own step.

    A parameter whose gradient is kept as a :class:`utils.column_sgd.ColumnGradient` (the sharded
    head's kernel) is stepped by :func:`utils.column_sgd.sgd_step_`: torch's arithmetic with that
    gradient, without a dense ``param.grad`` (which it is turned into where a group's options need
    torch's own step, or where ``param.grad`` exists too). ``zero_grad`` clears it as well. A
    gradient of some columns (negative sampling) leaves the other columns' steps pending;
    ``state_dict`` (a checkpoint) and any dense step apply them first."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused = []
        for group in self.param_groups:
            for p in group["params"]:
                if column_sgd.column_grad(p) is None:
                    continue
                if p.grad is not None or not column_sgd.fused_step_supported(group):
                    column_sgd.materialize_column_grad(p)
                else:
                    fused.append((group, p, column_sgd.take_column_grad(p)))
        for group in self.param_groups:      # torch's step moves every column: owed steps first
            for p in group["params"]:
                if p.grad is not None:
                    column_sgd.flush_pending_(p)
        folded = []
        for group in self.param_groups:
            decay = group["weight_decay"]
            if (decay == 0 or torch.is_tensor(decay) or group.get("maximize") or group.get("differentiable")
                    or any(p.grad is not None and p.grad.is_sparse for p in group["params"])):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(p, alpha=decay)
            folded.append((group, decay))
            group["weight_decay"] = 0
        try:
            super().step()
        finally:
            for group, decay in folded:
                group["weight_decay"] = decay
        for group, p, grad in fused:
            column_sgd.sgd_step_(p, grad, self.state[p], lr=group["lr"], momentum=group["momentum"],
                                 dampening=group["dampening"], weight_decay=group["weight_decay"],
                                 nesterov=group["nesterov"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                column_sgd.take_column_grad(p)

    def state_dict(self) -> dict:
        """torch's state dict, with the steps a sampled kernel owes applied first (see
        :func:`utils.column_sgd.flush_pending_`): a checkpoint holds up-to-date weights and momentum."""
        for group in self.param_groups:
            for p in group["params"]:
                column_sgd.flush_pending_(p)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load; pending steps are forgotten (the state is replaced) and a momentum buffer is
        laid out like its parameter (a checkpoint holds the E x C head row-major; the sharded head
        stores its kernel class-major)."""
        for group in self.param_groups:
            for p in group["params"]:
                column_sgd.drop_pending(p)
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            buf = state.get("momentum_buffer")
            if torch.is_tensor(buf) and buf.shape == p.shape and buf.stride() != p.stride():
                state["momentum_buffer"] = torch.empty_like(p).copy_(buf)


class Trainer(pl.LightningModule):
    """AdaFace training module (the published name). Hyper-parameters are the ``main.py`` flags
    plus ``class_num`` (the number of training identities) and ``val_set_names``."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.save_hyperparameters()
        hp = self.hparams
        self.class_num = int(hp.custom_num_class if hp.get("custom_num_class", -1) != -1 else hp.class_num)
        self.val_set_names: List[str] = list(hp.get("val_set_names") or VAL_SET_NAMES)
        self.model = net.build_model(model_name=hp.arch)
        self.memory_format = torch.channels_last if hp.get("channels_last") else torch.contiguous_format
        if hp.get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
            _contiguous_dropout_inputs(self.model)
        self.partial_fc = bool(hp.get("partial_fc"))
        if self.partial_fc:
            self._defer_sharded_head()
        else:
            self.head = heads.build_head(head_type=hp.head, embedding_size=512, class_num=self.class_num,
                                         m=hp.m, h=hp.h, t_alpha=hp.t_alpha, s=hp.s)
        self.cross_entropy_loss = CrossEntropyLoss()
        self._setup_compile()
        self._first_bad_step: Optional[torch.Tensor] = None  # asynchronous non-finite check (CUDA)
        self._steps_since_check = 0
        self._outputs: List[Dict[str, torch.Tensor]] = []
        self.last_results: Dict[str, float] = {}
        self.last_embeddings: Optional[Dict[str, np.ndarray]] = None
        if hp.get("start_from_model_statedict"):
            path = hp.start_from_model_statedict
            checkpoint = read_checkpoint(path, trust=bool(hp.get("trust_checkpoint")))
            load_backbone_weights(self.model, checkpoint, strict=True, source=str(path))
            logger.info("backbone initialised from %s", path)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        embeddings, norms = self._train_model(images.contiguous(memory_format=self.memory_format))
        logits = self._train_head(embeddings, norms, labels)
        return logits, norms, embeddings, labels

    def _setup_compile(self) -> None:
        """``--compile``: the training forward of the backbone and head go through
        :class:`utils.compile.CompiledCall` (plain attributes, so no ``_orig_mod.`` keys in the
        state_dict); validation and test run the modules eagerly (no second compilation)."""
        train_model, train_head = self.model, self.head
        self._compile_logged = not self.hparams.get("compile")
        if self.hparams.get("compile"):
            mode = self.hparams.get("compile_mode") or "default"
            train_model = CompiledCall(self.model, "backbone", mode)
            if self.head is not None:  # the sharded head (--partial_fc) runs eagerly
                train_head = CompiledCall(self.head, "head", mode)
        # plain attributes, not sub-modules: the state_dict keeps only model.* and head.*
        object.__setattr__(self, "_train_model", train_model)
        object.__setattr__(self, "_train_head", train_head)

    def _log_compile_time(self) -> None:
        """One log line with the compilation time, after the first compiled training forward."""
        self._compile_logged = True
        parts = [f"{c.name} {c.seconds:.1f} s" for c in (self._train_model, self._train_head)
                 if isinstance(c, CompiledCall) and c.active and c.seconds is not None]
        if parts:
            logger.info("torch.compile (mode=%s): compiled in the first training step: %s",
                        self.hparams.get("compile_mode") or "default", ", ".join(parts))

    # ------------------------------------------------------- sharded head (Partial FC)
    def _defer_sharded_head(self) -> None:
        """``--partial_fc``: the sharded head needs the process group, so :meth:`configure_model`
        builds it; it draws its columns from the random state in which the replicated head would
        have drawn its kernel, and the global generator moves on as if that had happened."""
        self.head = None
        self._head_rng_state = torch.get_rng_state()
        head_sharded.skip_kernel_draws(512, self.class_num)
        # each rank's kernel shard has its own shape and gradient: DDP must neither check nor average it
        self._ddp_params_and_buffers_to_ignore = ["head.kernel"]

    def configure_model(self) -> None:
        if self.partial_fc and self.head is None:
            hp = self.hparams
            generator = torch.Generator()
            generator.set_state(self._head_rng_state)
            self.head = head_sharded.build_sharded_head(
                hp.head, 512, self.class_num, m=hp.m, t_alpha=hp.t_alpha, h=hp.h, s=hp.s,
                stats=hp.get("partial_fc_stats") or "global", sample_rate=hp.get("sample_rate", 1.0),
                seed=hp.get("seed", 0), generator=generator)
            logger.info("sharded head: classes [%d, %d) of %d on rank %d of %d", self.head.start,
                        self.head.stop, self.class_num, self.head.rank, self.head.world)

    def _partial_fc_loss(self, images: torch.Tensor, labels: torch.Tensor, batch_idx: int) -> torch.Tensor:
        embeddings, norms = self._train_model(images.contiguous(memory_format=self.memory_format))
        embeddings = head_sharded.scale_gradient(embeddings, self.head.world)  # DDP divides by W
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        step = self.global_step * accumulate + batch_idx % accumulate   # the sampling stream's step
        return self.head(embeddings, norms, labels, step=step)

    def _kernel_state_index(self) -> int:
        """The kernel's key in the optimizer state (its place in :meth:`configure_optimizers`)."""
        return len(split_parameters(self.model)[0])

    def _head_group(self):
        return self.head.group if self.head.world > 1 else None

    def on_before_optimizer_step(self, optimizer) -> None:
        """16-mixed with shards: a step is skipped on every rank if any rank's gradients overflowed."""
        if not self.partial_fc or self.head.world == 1:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            return
        state = scaler._per_optimizer_states[id(getattr(optimizer, "_optimizer", optimizer))]
        for found in state.get("found_inf_per_device", {}).values():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX, group=self._head_group())

    def on_train_start(self) -> None:
        """``--partial_fc``: the kernel's gradient stays out of ``kernel.grad`` (see
        :class:`head_sharded.ShardedMarginHead`), except with ``--partial_fc_dense_grad`` and under
        16-mixed, whose gradient scaler unscales and checks ``.grad`` tensors only."""
        if self.partial_fc:
            precision = str(getattr(self.trainer, "precision", "32"))
            dense = bool(self.hparams.get("partial_fc_dense_grad")) or precision.startswith("16")
            self.head.defer_kernel_grad = not dense
            logger.info("sharded head: kernel gradient %s", "dense (kernel.grad)" if dense
                        else "deferred to the optimizer step")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.partial_fc and gradient_clip_val and gradient_clip_algorithm == "value":
            column_sgd.materialize_column_grad(self.head.kernel)   # clip_grad_value_ reads .grad
        if not (self.partial_fc and gradient_clip_val) or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [*self.model.parameters(), self.head.kernel]
        norm = head_sharded.global_grad_norm(self.model.parameters(), [self.head.kernel], self._head_group())
        coef = (float(gradient_clip_val) / (norm + 1e-6)).clamp(max=1.0)   # the global norm over all shards
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        kept = column_sgd.column_grad(self.head.kernel)
        if kept is not None:
            kept.mul_(coef)

    def on_train_end(self) -> None:
        if self.partial_fc and self.head.world > 1:
            head_sharded.check_replicas_in_sync(self.model, self._head_group())
            logger.info("backbone identical on all %d ranks after %d steps", self.head.world, self.global_step)

    def get_current_lr(self) -> float:
        return self.trainer.optimizers[0].param_groups[0]["lr"]

    def training_step(self, batch, batch_idx):
        images, labels = batch[0], batch[1]
        if self.partial_fc:
            loss = self._partial_fc_loss(images, labels, batch_idx)
        else:
            logits, norms, _, labels = self(images, labels)
            loss = self.cross_entropy_loss(logits, labels)
        if not self._compile_logged:
            self._log_compile_time()
        self._stop_on_non_finite(loss)
        self.log("lr", self.get_current_lr(), on_step=True, on_epoch=True, logger=True)
        # the progress bar reads its values back every step (a host synchronisation on a GPU); the
        # loggers read them every log_every_n_steps steps
        self.log("train_loss", loss, on_step=True, on_epoch=True, logger=True, prog_bar=not loss.is_cuda)
        return loss

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Stop training on a NaN or infinite loss. On the CPU at once; on a GPU the first bad step
        is recorded on the device and read back only every ``log_every_n_steps`` steps, at the end
        of an epoch and before a checkpoint is written (no host synchronisation per step)."""
        if loss.is_cuda:
            self._record_non_finite(loss)
            self._steps_since_check += 1
            every = self.trainer.log_every_n_steps if self._trainer is not None else 1
            if self._steps_since_check >= max(1, every):
                self.check_non_finite()
            return
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank stops
        if bad:
            self._raise_non_finite(self.global_step)

    def _record_non_finite(self, loss: torch.Tensor) -> None:
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        new_bad = (self._first_bad_step < 0) & ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(new_bad, self.global_step, self._first_bad_step)

    def check_non_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss recorded since the last check was not finite
        (one host synchronisation; every process must call it at the same point)."""
        self._steps_since_check = 0
        if self._first_bad_step is None:
            return
        first = self._first_bad_step.clone()
        if (self._trainer is not None and self.trainer.world_size > 1
                and torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MAX)  # every rank stops
        first = int(first)
        if first >= 0:
            self._raise_non_finite(first)

    def on_train_epoch_end(self) -> None:
        self.check_non_finite()

    def _raise_non_finite(self, step: int) -> None:
        raise NonFiniteLossError(
            f"training loss is not finite at epoch {self.current_epoch}, global step "
            f"{step}; stopping. The last good checkpoint is kept in "
            f"{self.hparams.get('output_dir') or 'the output folder'} (last.ckpt). Try a lower --lr "
            f"or --precision 32 / bf16-mixed.")

    def configure_optimizers(self):
        decay, no_decay = split_parameters(self.model)
        optimizer = SGD([{"params": decay + [self.head.kernel], "weight_decay": self.hparams.weight_decay},
                         {"params": no_decay}], lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = lr_scheduler.MultiStepLR(optimizer, milestones=list(self.hparams.lr_milestones),
                                             gamma=self.hparams.lr_gamma)
        return [optimizer], [scheduler]

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add ``rng_states``: one entry per process, in rank order; with ``--partial_fc`` gather the
        head's shards into the published layout (every process calls this). A non-finite loss
        recorded since the last check stops training here, before its state is written."""
        self.check_non_finite()
        if self.partial_fc:
            from utils.checkpoint_io import SafeCheckpointIO
            to_disk = (self._trainer is not None
                       and isinstance(self.trainer.strategy.checkpoint_io, SafeCheckpointIO))
            # to_disk: rank 0 gathers into files that SafeCheckpointIO writes into the checkpoint
            # (one shard in memory at a time); otherwise into memory (two full E x C tensors)
            head_sharded.gather_head_checkpoint(checkpoint, self.head, self._kernel_state_index(),
                                                to_disk=to_disk,
                                                directory=self.hparams.get("output_dir") or None)
        states = capture_rng_states()
        if (self._trainer is not None and self.trainer.world_size > 1
                and torch.distributed.is_available() and torch.distributed.is_initialized()):
            gathered: List[Optional[dict]] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore this process's random generators from ``rng_states`` when the checkpoint was
        written by as many processes as run now; with ``--partial_fc`` take this rank's columns of
        the full kernel and optimizer state (for any number of processes)."""
        if self.partial_fc:
            self.configure_model()
            # SafeCheckpointIO maps the file under --partial_fc: copy what is kept (this rank's
            # columns of the full head tensors, everything else whole), so the file is read once
            head_sharded.own_checkpoint_tensors(checkpoint, skip_shape=(512, self.class_num))
            head_sharded.shard_head_checkpoint(checkpoint, self.head, self._kernel_state_index())
        states = checkpoint.get("rng_states")
        if not states or self._trainer is None:
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if len(states) != world:
            logger.warning("the checkpoint holds the random generators of %d process(es), this run "
                           "has %d: dropout will not continue its stream exactly", len(states), world)
            return
        restore_rng_states(states[rank])

    # ---------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch, batch_idx):
        images, issame, set_index, image_index = batch
        images = images.contiguous(memory_format=self.memory_format)
        features, norms = embed_batch(self.model, images, use_flip=True, fusion_method="pre_norm_vector_add")
        self._outputs.append({"output": features.float(), "norm": norms.float(), "target": issame.long(),
                              "dataname": set_index, "image_index": image_index})

    def on_validation_epoch_end(self) -> None:
        results = self._evaluate_outputs("val")
        results["epoch"] = float(self.current_epoch)
        for key, value in results.items():
            self.log(key, value, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        results = self._evaluate_outputs("test")
        if results:
            results["epoch"] = float(self.current_epoch)  # logged at test too, as published
        for key, value in results.items():
            self.log(key, value, sync_dist=False)

    def gather_outputs(self) -> Dict[str, np.ndarray]:
        """All ranks' outputs, without the duplicates a distributed sampler pads with, by image index."""
        if not self._outputs:
            return {}
        local = {k: torch.cat([o[k] for o in self._outputs]) for k in self._outputs[0]}
        if self._trainer is not None and self.trainer.world_size > 1:
            local = {k: self.all_gather(v) for k, v in local.items()}
            local = {k: v.reshape(-1, *v.shape[2:]) for k, v in local.items()}
        merged = {k: v.detach().cpu().numpy() for k, v in local.items()}
        _, first = np.unique(merged["image_index"], return_index=True)  # sorted by image index
        return {k: v[first] for k, v in merged.items()}

    def _evaluate_outputs(self, stage: str) -> Dict[str, float]:
        out = self.gather_outputs()
        self._outputs = []
        if not out:
            return {}
        results: Dict[str, float] = {}
        accuracies = []
        for set_index, name in enumerate(self.val_set_names):
            rows = out["dataname"] == set_index
            if not rows.any():
                continue
            embeddings = out["output"][rows]
            if len(embeddings) % 2:  # a partial run (fast_dev_run, limit_val_batches) cut a pair
                embeddings = embeddings[:-1]
            issame = out["target"][rows][0:len(embeddings):2].astype(bool)
            folds = min(10, len(issame))
            if folds < 2:
                continue
            if folds < 10:
                logger.warning("%s: only %d pairs were embedded; using %d folds instead of 10",
                               name, len(issame), folds)
            summary = evaluate_pair_set(embeddings, issame, nrof_folds=folds)
            results[f"{name}_{stage}_acc"] = summary["acc"]
            results[f"{name}_{stage}_best_threshold"] = summary["best_threshold"]
            if stage == "val":  # the published train_val.py's name for the same value
                results[f"{name}_best_threshold"] = summary["best_threshold"]
            results[f"{name}_num_{stage}_samples"] = float(len(embeddings))
            accuracies.append(summary["acc"])
        results[f"{stage}_acc"] = float(np.mean(accuracies)) if accuracies else math.nan
        self.last_results = results
        self.last_embeddings = out
        return results
