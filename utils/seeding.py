"""Random streams that make training reproducible and its resume exact.

* :func:`stream_seed` turns a tuple of integers (the run's seed, a stream tag, the epoch, ...) into
  a 63-bit seed with NumPy's ``SeedSequence`` (well mixed, so nearby tuples give unrelated streams).
* :func:`sample_random_state` is the random state of one training sample in one epoch: a
  ``numpy.random.RandomState`` (whose methods draw exactly as the global ``np.random`` functions
  do, so the augmenter stays equal to the published one draw for draw) and, inside the ``with``
  block, torch's CPU generator seeded for that sample and restored afterwards. The shuffle order
  (``data.EpochSampler``) and every augmentation draw are thus functions of (seed, epoch, sample
  index) only, whichever process or DataLoader worker computes them.
* :func:`capture_rng_states` / :func:`restore_rng_states` save the global generators (torch CPU and
  CUDA, NumPy, ``random``) as plain types (tensors, ints, floats, lists, dicts) for checkpoints, so
  that dropout continues its stream after a resume.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

# Stream tags: the second word of every seed tuple, so that no two streams share a tuple.
SHUFFLE_STREAM = 0
SAMPLE_STREAM = 1

_SEED_MASK = (1 << 63) - 1


def stream_seed(*words: int) -> int:
    """A 63-bit seed derived from integers (all of them matter, in order; compare tuples of one
    length only: ``SeedSequence`` pads with zeros, so ``(a, b)`` and ``(a, b, 0)`` agree)."""
    entropy = [int(w) % (1 << 64) for w in words]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) & _SEED_MASK


@contextlib.contextmanager
def sample_random_state(seed: int, epoch: int, index: int) -> Iterator[np.random.RandomState]:
    """The random state of sample ``index`` in ``epoch``: yields its NumPy ``RandomState`` (on a
    PCG64 bit generator: cheap to create, about 40 us); torch's CPU generator is seeded for the
    sample inside the block and restored when it ends (so the caller's own torch stream, e.g.
    dropout in the main process, is untouched)."""
    sequence = np.random.SeedSequence([int(seed) % (1 << 64), SAMPLE_STREAM, int(epoch), int(index)])
    numpy_state = np.random.RandomState(np.random.PCG64(sequence))
    # PCG64 takes the sequence's first 4 words; the 5th seeds torch
    torch_seed = int(sequence.generate_state(5, np.uint64)[4]) & _SEED_MASK
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed(torch_seed)
    try:
        yield numpy_state
    finally:
        torch.set_rng_state(saved)


def capture_rng_states() -> Dict[str, Any]:
    """This process's global random generators, as plain types (see :func:`restore_rng_states`)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    """Set the global generators to what :func:`capture_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["internal"]),
                     python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
