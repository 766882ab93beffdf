"""Console hygiene shared by the exporters, importing nothing optional (every target can use it).

``--json`` owns stdout and errors are one line on stderr, but converters print: torch.onnx's TorchScript exporter
dumps its whole IR from C++ on failure, coremltools draws tqdm bars and logs version warnings. :func:`quiet`
therefore redirects file descriptors 1 and 2, not just ``sys.stdout``, and mutes Python warnings and one logger.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def logger_level(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Set the logger ``logger_name`` to ``level`` for the duration, then restore it (e.g. around a library's
    import, whose own log lines would break the one-line stderr contract)."""
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def quiet(logger_name: str, *, python_stderr: bool = False) -> Iterator[None]:
    """Silence fds 1 and 2, ``sys.stdout`` (and ``sys.stderr`` when ``python_stderr``), warnings and the logger
    ``logger_name`` (set to ERROR) for the duration; everything is restored after, also on an exception."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), \
                (contextlib.redirect_stderr(io.StringIO()) if python_stderr else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        logger.setLevel(level)
