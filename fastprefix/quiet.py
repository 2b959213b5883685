"""Keeping other packages' noise out of what the command line prints (`--verbose` turns this off; the
profiler's native log lines are `profiling`'s to drop).

A warning is attributed to the code that made the call it warns about: the innermost frame of its stack outside
the packages that raise warnings on their callers' behalf (torch, transformers, the standard library's warning
and import machinery). `transformers` raising "`past_key_values` is deprecated" because PEFT's forward passed
that argument is PEFT's warning, and hidden; the same warning caused by a call in fastprefix is fastprefix's,
and printed, so that it gets fixed where the call is (through `compat`).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings

PASS_THROUGH = ("torch", "transformers", "warnings", "contextlib", "functools", "importlib", "fastprefix.quiet")
"""Modules (and their submodules) that raise warnings about their callers' calls: skipped when attributing."""
OWN = "fastprefix"


def caller_package(frame) -> str:
    """The module name of the innermost frame, from `frame` outwards, that is not in PASS_THROUGH ("" if none)."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == name or module.startswith(name + ".") for name in PASS_THROUGH):
            return module
        frame = frame.f_back
    return ""


class HiddenWarnings:
    """The warnings hidden by `others_warnings_hidden`, counted by the package whose call raised them."""

    def __init__(self):
        self.by_package: collections.Counter[str] = collections.Counter()

    def summary(self) -> str:
        """One line for stderr, or "" when nothing was hidden."""
        if not self.by_package:
            return ""
        counts = ", ".join(f"{n} from {package}" for package, n in self.by_package.most_common())
        return f"hidden: warnings raised by other packages' own calls ({counts}); --verbose shows them"


@contextlib.contextmanager
def others_warnings_hidden(verbose: bool = False):
    """Within the block, warnings attributed to another package's calls are counted instead of printed; those
    attributed to fastprefix (or to the script run as __main__) are printed as usual. Yields the
    `HiddenWarnings`. With `verbose`, every warning is printed."""
    hidden = HiddenWarnings()
    with warnings.catch_warnings():
        printed = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            package = caller_package(sys._getframe(1)).split(".")[0]
            if verbose or package in (OWN, "__main__", ""):
                printed(message, category, filename, lineno, file, line)
            else:
                hidden.by_package[package] += 1

        warnings.showwarning = show
        yield hidden


def hide_progress_bars() -> None:
    """transformers' own progress bars (loading weights): the command line draws its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()
