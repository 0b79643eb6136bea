"""What every training command's ``main`` shares (torchvision-reference style: each command is
``get_args_parser()`` + ``main(args)``, dispatched by ``python -m train``).

:func:`run_command` runs the command's work; an expected failure — a file that cannot be read,
an invalid option or data set, a bundle the node refuses — is one line on stderr,
``<command>: <reason>``, and exit status 2; otherwise the result is shown (JSON on stdout by
default) and the status is 0. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from dicom_node.errors import DicomNodeError

__all__ = ["COMMAND_ERRORS", "print_json", "run_command"]

T = TypeVar("T")

#: the failures a command reports as its exit status 2.
COMMAND_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, DicomNodeError)


def print_json(result: Any) -> None:
    """``result`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def run_command(
    name: str,
    work: Callable[[], T],
    show: Callable[[T], None] = print_json,
    *,
    errors: tuple[type[Exception], ...] = COMMAND_ERRORS,
) -> int:
    """``work()``, then ``show(result)``: exit status 0; ``errors`` raised by ``work`` are
    ``name: error`` on stderr and status 2 (``show`` runs outside, so what it writes fails
    loudly)."""
    try:
        result = work()
    except errors as error:
        sys.stderr.write(f"{name}: {error}\n")
        return 2
    show(result)
    return 0
