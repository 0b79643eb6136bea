"""How outputs reach a destination of each ``type``: the :class:`Transport` protocol and the
registry of destination types.

A transport sends files to one destination. The registry maps a destination's ``type`` in
conf.yaml to its :class:`DestinationType`: what such a destination needs in its settings
(``check``, run when conf.yaml is validated, so a missing key is named at ``check-config``) and
how its transport is opened (``open``). :class:`~dicom_node.config.DestinationConfig` accepts
exactly the registered types; the sender opens one transport per destination through
:func:`open_transport` and never names a transport module.

The built-in types register themselves when their module is imported, and
:mod:`dicom_node.send` imports them:

* ``dimse`` (the default): C-STORE SCU, :mod:`dicom_node.send.scu`;
* ``dicomweb``: STOW-RS, :mod:`dicom_node.send.stow`.

Adding a destination type is one new module and one config entry. The module defines the
transport and registers it at import (one line in ``dicom_node/send/__init__.py`` imports it,
as it does the built-ins)::

    class FolderTransport:
        def __init__(self, destination, policy, calling_ae_title): ...
        def send(self, paths, on_each=None): ...   # path -> None (delivered) or a Failure

    register(DestinationType("folder", open=FolderTransport, check=check_folder))

and conf.yaml names it: ``destinations: [{name: archive, type: folder, url: file:///srv/x}]``.
Its answers are classified by :mod:`dicom_node.send.failures`, as every transport's are. The
settings a type can use are the fields of ``DestinationConfig`` (``url``, ``tls``,
``timeout_s``, credentials, ...); a type that needs another field adds it there.

Transport modules import the shared modules of this package (this one,
:mod:`~dicom_node.send.failures`, :mod:`~dicom_node.send.requestor`), never one another
(tests/unit/test_imports.py holds them to it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the config imports this module to validate destination types
    from dicom_node.config import DestinationConfig, SendConfig

__all__ = [
    "DestinationType",
    "OnEach",
    "Results",
    "Transport",
    "destination_type",
    "destination_types",
    "open_transport",
    "register",
    "unregister",
]

#: path → None (delivered) or why not (a :class:`~dicom_node.send.failures.Failure`; a plain
#: string is a failure worth retrying).
Results = dict[Path, str | None]
#: ``on_each(path, result)``: one output's result, as soon as the destination answered it.
OnEach = Callable[[Path, str | None], None]


class Transport(Protocol):
    """Sends outputs to one destination.

    :meth:`send` may be called from several threads at once (``send.associations``): each call
    is one association, one request; it never raises for what the destination answers.
    """

    def send(self, paths: Sequence[Path], on_each: OnEach | None = None) -> Results:
        """Send ``paths``; returns each one's result (:data:`Results`), every path included.

        ``on_each(path, result)``, when given, is called as soon as each output is answered, so
        that the outbox records a delivery before the next output goes (a crash then resends
        only the one in flight). A transport whose answer covers all the outputs at once may
        leave that to the mapping it returns.
        """
        ...


def _accept(destination: DestinationConfig) -> None:
    """A type whose destinations need no particular settings."""


@dataclass(frozen=True)
class DestinationType:
    """A ``type:`` of destination: its name in conf.yaml, the check of a destination's settings
    (raises ``ValueError`` naming the missing or wrong key and the fix; run by the config's
    validation) and the factory of its transport: ``open(destination, policy, calling_ae_title)``
    with ``policy`` the ``send:`` section and ``calling_ae_title`` the node's AE title."""

    name: str
    open: Callable[[DestinationConfig, SendConfig, str], Transport]
    check: Callable[[DestinationConfig], None] = field(default=_accept)


_types: dict[str, DestinationType] = {}
_lock = threading.Lock()


def register(kind: DestinationType) -> DestinationType:
    """Make ``kind.name`` a destination type (once: a second, different registration under the
    same name is an error, not a silent replacement)."""
    with _lock:
        known = _types.get(kind.name)
        if known is not None and known != kind:
            raise ValueError(f"destination type {kind.name!r} is already registered")
        _types[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Forget destination type ``name`` (a test's toy type, after the test)."""
    with _lock:
        _types.pop(name, None)


def destination_types() -> tuple[str, ...]:
    """The registered type names, sorted."""
    with _lock:
        return tuple(sorted(_types))


def destination_type(name: str) -> DestinationType:
    """The registered type ``name``.

    Raises
    ------
    ValueError
        No such type; the message lists the registered ones.
    """
    with _lock:
        kind = _types.get(name)
    if kind is None:
        known = ", ".join(destination_types()) or "none"
        raise ValueError(f"unknown destination type {name!r}: use one of {known}")
    return kind


def open_transport(
    destination: DestinationConfig, policy: SendConfig, calling_ae_title: str
) -> Transport:
    """The transport of ``destination``'s type, for ``destination``."""
    return destination_type(destination.type).open(destination, policy, calling_ae_title)
