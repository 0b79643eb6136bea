"""DICOM TLS contexts (PS3.15 Annex B, BCP 195): TLS 1.2 or later, certificates from files.

The node's SCP takes :func:`server_context` (its handshake runs in the pre-association gate,
:mod:`dicom_node.receive.guard`, so a silent TLS client holds only its own connection); each
destination with ``tls:`` gets :func:`client_context` and pynetdicom's ``tls_args``.
"""

from __future__ import annotations

import ssl

from dicom_node.config import TlsConfig
from dicom_node.errors import ConfigError

__all__ = ["client_context", "server_context"]


def _base(purpose: ssl.Purpose, protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.0 / 1.1 refused
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def _load(context: ssl.SSLContext, tls: TlsConfig, who: str) -> None:
    try:
        if tls.certificate is not None and tls.private_key is not None:
            context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=tls.ca_certificates)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
        raise ConfigError(f"{who} tls: cannot load the certificates or key: {reason}") from None


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SCP's context: our certificate; client certificates verified against
    ``ca_certificates`` (required with ``require_client_certificate``)."""
    context = _base(ssl.Purpose.CLIENT_AUTH, ssl.PROTOCOL_TLS_SERVER)
    _load(context, tls, "node")
    if tls.ca_certificates is None:
        context.verify_mode = ssl.CERT_NONE
    elif tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsConfig, who: str = "destination") -> ssl.SSLContext:
    """A destination's context: the server's certificate verified (against
    ``ca_certificates``, else the system's CAs) and its name checked; our certificate for
    mutual TLS when given."""
    context = _base(ssl.Purpose.SERVER_AUTH, ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_certificates is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _load(context, tls, who)
    return context
