"""Which library messages the CLI mutes: only the known-noisy ones, listed here by logger (or warning category)
and message; everything else reaches stderr (a tracer warning is what a user needs when an export is wrong).
``--quiet`` mutes every library warning; ``--debug`` mutes none.

Each entry says where it comes from and why it says nothing to a laptop-deploy user.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# logger name -> message patterns (re.search). Filters sit on the emitting logger itself, the only place a
# logging.Filter sees a record before it propagates to the library's own handler.
LOGGED_NOISE: dict[str, tuple[str, ...]] = {
    # transformers 5 on import of a pipeline's CLIP parts without torchvision: we never use the image processor.
    "transformers.utils.import_utils": (r"requires torchvision \(not installed\); falling back",),
    # torchao (pulled in by ExecuTorch) on import: CUDA kernels that a CPU machine cannot load.
    "torchao": (r"^Failed to load .*\.so", r"^Skipping import of cpp extensions"),
    # diffusers' torchao quantizer on import when torchao's optional tensor types are missing: we load none.
    "diffusers.quantizers.torchao.torchao_quantizer": (r"^Unable to import `torchao` Tensor objects",),
    # torch on torchao's import: a deprecation inside torchao, not in anything laptop-deploy calls.
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch\.compile",),
}
# (category, module regex) of warnings.warn chatter: the libraries' own deprecation notices about their APIs.
WARNED_NOISE: tuple[tuple[type[Warning], str], ...] = tuple(
    (category, module) for category in (FutureWarning, DeprecationWarning)
    for module in (r"huggingface_hub(\.|$)", r"diffusers(\.|$)", r"transformers(\.|$)"))


class _KnownNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextmanager
def library_noise(*, quiet: bool = False, debug: bool = False) -> Iterator[None]:
    """While the verb runs: the known-noisy messages muted, or (``quiet``) every warning and every log record
    below ERROR, or (``debug``) nothing. Everything is restored on exit (in-process callers, tests)."""
    added: list[tuple[logging.Logger, logging.Filter]] = []
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
        elif not debug:
            for category, module in WARNED_NOISE:
                warnings.filterwarnings("ignore", category=category, module=module)
            for name, patterns in LOGGED_NOISE.items():
                added.append((logging.getLogger(name), _KnownNoise(patterns)))
                added[-1][0].addFilter(added[-1][1])
        try:
            yield
        finally:
            logging.disable(previous)
            for logger, known in added:
                logger.removeFilter(known)
