"""``--compile``: the training forward of the backbone and the head through ``torch.compile``.

:class:`CompiledCall` calls a module through ``torch.compile`` without registering the compiled
wrapper as a sub-module, so ``state_dict`` keys stay the module's own (no ``_orig_mod.``) and a
compiled run's checkpoint loads into an uncompiled model. Compilation happens on the first call; it
is timed, and the backward graph is compiled in that same call, so that a compiler failure shows up
there. Any failure of ``torch.compile`` logs a warning naming the reason and the module is called
eagerly from then on: training never stops because a compiler is missing or broken.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The backend handed to ``torch.compile``; tests replace it with one that fails.
BACKEND: Union[str, Callable] = "inductor"


def _same_random_numbers():
    """Inductor draws dropout masks from its own generator unless told to call PyTorch's random
    operators: with them a compiled run draws the same masks as an eager one (and resumes alike)."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(fallback_random=True)


class CompiledCall:
    """Call ``module`` through ``torch.compile(module, mode=mode)``, falling back to eager on failure.

    ``seconds`` is the duration of the first (compiling) call, ``None`` before it or after a
    fallback; ``active`` is False once the module runs eagerly.
    """

    def __init__(self, module: nn.Module, name: str, mode: str = "default") -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; valid modes: {', '.join(COMPILE_MODES)}")
        self.module, self.name, self.mode = module, name, mode
        self.active = True
        self.seconds: Optional[float] = None
        self._compiled: Optional[Callable] = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.module(*args, **kwargs)
        if self.seconds is None:
            return self._first_call(*args, **kwargs)
        try:
            with _same_random_numbers():
                return self._compiled(*args, **kwargs)
        except ValueError:  # the module's own input checks: not a compiler failure
            raise
        except Exception as error:  # a recompilation (new shape, mode) failed
            self._fall_back(error)
            return self.module(*args, **kwargs)

    def _first_call(self, *args: Any, **kwargs: Any) -> Any:
        # a failure after part of the module ran would update BatchNorm / AdaFace statistics twice
        saved = {key: value.detach().clone() for key, value in self.module.named_buffers()}
        start = time.perf_counter()
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.module, mode=self.mode, backend=BACKEND)
            import torch._functorch.config as functorch_config
            with functorch_config.patch(force_non_lazy_backward_lowering=True), _same_random_numbers():
                output = self._compiled(*args, **kwargs)
        except ValueError:
            raise
        except Exception as error:
            with torch.no_grad():
                for key, value in self.module.named_buffers():
                    value.copy_(saved[key])
            self._fall_back(error)
            return self.module(*args, **kwargs)
        self.seconds = time.perf_counter() - start
        return output

    def _fall_back(self, error: BaseException) -> None:
        inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed wraps the cause
        cause = inner if isinstance(inner, BaseException) else error
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        logger.warning("torch.compile of the %s failed (%s); training continues eagerly (without "
                       "--compile)", self.name, reason)
        self.active = False
        self.seconds = None
        self._compiled = None
