"""Launch machinery the Triton attention kernels share (`triton_flash.py`, `triton_decode.py`).

`Launcher` runs one kernel with an autotuned, a first-fitting, (under TRITON_INTERPRET=1) a fixed, or a
pinned config; the kernels' modules own their config lists and the estimates of which configs fit.
Also here: the switches read from the environment (INTERPRET, AUTOTUNE), the shared-memory budget those
estimates check against, the errors that mean "this config does not suit the device", and the check that
tensors are on a device the kernels can run on.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.compiler import errors as _compile_errors
from triton.runtime import errors as _triton_errors

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
AUTOTUNE = not INTERPRET and os.environ.get("LONGREACH_TRITON_AUTOTUNE", "1") != "0"
LOG2E = 1.4426950408889634
UNBOUNDED = 1 << 30  # a window side of -1 becomes this; keeps every index sum inside int32
SMEM_BUDGET = 200 * 1024
# Errors a config that does not suit the device raises when compiled or loaded: the set triton's own
# autotuner skips (PTXASError exists from triton 3.2 on). Anything else, a CUDA fault above all, propagates:
# after an illegal access the context is broken, and trying the next config would only hide the cause.
_CONFIG_ERRORS = tuple(
    getattr(module, name)
    for module, name in (
        (_triton_errors, "OutOfResources"),
        (_triton_errors, "PTXASError"),
        (_compile_errors, "CompileTimeAssertionFailure"),
    )
    if hasattr(module, name)
)


def require_device(t: torch.Tensor):
    """The decode and KV-write kernels run on CUDA tensors, or on any under TRITON_INTERPRET=1."""
    if not (t.is_cuda or INTERPRET):
        raise ValueError(
            f"the Triton decode kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 "
            "before importing triton to run them on CPU"
        )


class Launcher:
    """One kernel launched with an autotuned, a first-fitting, (interpreter) a fixed, or a pinned config.

    `fits(config, args)` drops configs whose tiles cannot fit; `key` names the arguments the
    autotuner (and the first-fit cache) keys on, besides the tensors' dtypes. The switches are read
    through `_interpret()` (at each launch) and `_autotune()` (once, here), which a subclass may redirect.
    """

    def __init__(self, fn, configs, key, fits, interpret_meta):
        self.fn, self.configs, self.key, self.fits, self.interpret_meta = (
            fn,
            configs,
            key,
            fits,
            interpret_meta,
        )
        self.chosen: dict[tuple, triton.Config] = {}
        self.tuned = None
        if self._autotune():
            self.tuned = triton.autotune(
                configs=configs, key=key, prune_configs_by={"early_config_prune": self._prune}
            )(fn)

    def _interpret(self) -> bool:
        return INTERPRET

    def _autotune(self) -> bool:
        return AUTOTUNE

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c for c in configs if self.fits(c, args)] or [configs[-1]]

    def candidates(self, **args) -> list[triton.Config]:
        """The configs the autotuner may choose for a launch with these arguments (those that fit)."""
        return self._prune(self.configs, args)

    def _launch(self, grid, config: triton.Config, kwargs: dict):
        self.fn[grid](**kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def __call__(self, grid, config: triton.Config | None = None, **kwargs):
        """Launch `fn` on `grid` with the kernel arguments `kwargs`; `config` pins the tile config
        (any device, interpreter included), else it is autotuned, first-fit or fixed."""
        if config is not None:
            self._launch(grid, config, kwargs)
            return
        if self._interpret():
            self.fn[grid](**kwargs, **self.interpret_meta)
            return
        if self.tuned is not None:
            self.tuned[grid](**kwargs)
            return
        key = tuple(kwargs[k] for k in self.key) + tuple(
            str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor)
        )
        if key in self.chosen:
            self._launch(grid, self.chosen[key], kwargs)
            return
        first_error = None
        for candidate in self._prune(self.configs, {}, **kwargs):
            try:  # shared memory or registers the estimate missed fail at compile time: try the next config
                self._launch(grid, candidate, kwargs)
            except _CONFIG_ERRORS as e:
                first_error = first_error or e
                continue
            self.chosen[key] = candidate
            return
        raise RuntimeError(
            f"no config of {getattr(self.fn, '__name__', 'kernel')} compiles for {dict(zip(self.key, key))}"
        ) from first_error


__all__ = ["AUTOTUNE", "INTERPRET", "LOG2E", "SMEM_BUDGET", "UNBOUNDED", "Launcher", "require_device"]
