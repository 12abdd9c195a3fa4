"""Progress on a terminal, silence in scripts.

A command that takes more than a few seconds (train, evaluate, merge,
quantize, the first conversion of the embedded model) shows progress bars on
standard error when it is a terminal. In a script it prints none: with
``--json``, or when standard error is a pipe, a file, a CI log or a notebook.
``QLORA_GUIDE_PROGRESS=1`` shows them anyway, ``QLORA_GUIDE_PROGRESS=0``
never. The libraries' own bars (transformers' weight loading, datasets'
maps, the Trainer's) follow the same rule.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

PROGRESS_ENV = "QLORA_GUIDE_PROGRESS"
_quiet = False


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """No bars while the block runs (what ``--json`` asks), whatever the terminal."""
    global _quiet
    before, _quiet = _quiet, _quiet or on
    try:
        yield
    finally:
        _quiet = before


def enabled() -> bool:
    """Whether bars are shown: forced by ``QLORA_GUIDE_PROGRESS``, else only on a terminal and without ``--json``."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("0", "false", "off", "no") or _quiet:
        return False
    if setting in ("1", "true", "on", "yes"):
        return True
    return sys.stderr.isatty()


def bar(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str | None = None, unit: str = "it") -> Any:
    """A tqdm bar on standard error that disappears when done, or a silent one where :func:`enabled` is false."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), leave=False, file=sys.stderr,
                dynamic_ncols=True)


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """Let transformers' and datasets' own bars follow :func:`enabled` while the block runs, then restore them."""
    from transformers.utils import logging as hf_logging

    if enabled():
        yield
        return
    datasets = sys.modules.get("datasets")  # only if already imported: importing it costs memory and time
    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets_on = datasets is not None and datasets.is_progress_bar_enabled()
    gguf = _gguf_loader()  # transformers' GGUF reader draws its bar with tqdm directly, past the switch above
    gguf_bar = gguf.tqdm if gguf is not None else None
    hf_logging.disable_progress_bar()
    if datasets_on:
        datasets.disable_progress_bars()
    if gguf is not None:
        gguf.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if datasets_on:
            datasets.enable_progress_bars()
        if gguf is not None:
            gguf.tqdm = gguf_bar


def _gguf_loader() -> Any:
    """transformers' GGUF module, or None where it cannot be imported (no ``gguf`` package)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as module
    except ImportError:
        return None
    return module if hasattr(module, "tqdm") else None


class Stages:
    """One bar over the named stages of a long command ("merge: checking the weights, 3/6")."""

    def __init__(self, desc: str, total: int) -> None:
        self._bar = bar(total=total, desc=desc, unit="stage")
        self._started = False

    def __call__(self, name: str) -> None:
        """Start the next stage (the previous one is counted as done)."""
        if self._started:
            self._bar.update()
        self._started = True
        self._bar.set_postfix_str(name)

    def close(self) -> None:
        self._bar.close()
