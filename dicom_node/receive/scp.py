"""DIMSE ingress: a pynetdicom Storage SCP (C-ECHO, C-STORE) in front of an instance sink.

Only projection radiography is accepted (CR, DX, MG, IO, for presentation and for processing)
in the transfer syntaxes the preprocessing can decode; anything else is refused while the
presentation contexts are negotiated. When peers are configured, associations from unknown
calling AE titles or hosts are rejected before negotiation. Connections pass the
pre-association gate of :mod:`dicom_node.receive.guard` first (TLS handshake, A-ASSOCIATE-RQ
within a short timeout, PDU lengths and deadlines), and one host may hold at most
``max_associations_per_host`` associations.

The C-STORE handler validates the data set and hands the encoded file to the sink, which
stores it durably before the success status goes back. Storage errors become DICOM status
codes here and nowhere else. Logs carry UIDs and AE titles, never patient identifiers.

About 450 lines in one file: negotiation, the allow-list and the C-STORE handler are the one
layer pynetdicom's events call into, and each status it answers is decided here.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalIntraOralXRayImageStorageForPresentation,
    DigitalIntraOralXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessProcess14,
)
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_node.audit import Audit, NullAudit
from dicom_node.config import NodeConfig, PeerConfig
from dicom_node.problems import NOT_RADIOGRAPH
from dicom_node.receive.guard import (
    MAX_UNLIMITED_PDU,
    GateSettings,
    GuardedServer,
    start_guarded_server,
)
from dicom_node.receive.ingest import (
    CANNOT_UNDERSTAND,
    SOP_CLASS_MISMATCH,
    SOP_CLASS_NOT_SUPPORTED,
    UNABLE_TO_PROCESS,
    Ingest,
    InstanceSink,
    Source,
    loggable_uid,
    uid_of,
)
from dicom_node.receive.validate import check_deflate
from dicom_node.tls import server_context

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "InstanceSink",
    "StorageScp",
]

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalIntraOralXRayImageStorageForPresentation,
    DigitalIntraOralXRayImageStorageForProcessing,
)
"""Projection radiography storage SOP classes accepted by the SCP (PS3.4 Annex B)."""

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessProcess14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""Transfer syntaxes accepted for storage; any other (big endian, video...) is refused."""

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent by the service user; rejected-transient
# by the service provider (presentation related function), local limit exceeded.
_REJECTED_PERMANENT = 0x01
_REJECTED_TRANSIENT = 0x02
_SERVICE_USER = 0x01
_SERVICE_PROVIDER_PRESENTATION = 0x03
_LOCAL_LIMIT_EXCEEDED = 0x02
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07

_VERIFICATION = "1.2.840.10008.1.1"

# pynetdicom logs query identifiers (patient names and IDs) at DEBUG unless told not to.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False


class StorageScp:
    """Verification and Storage SCP for projection radiographs.

    Parameters
    ----------
    settings : NodeConfig
        AE title, address and association limits (``node:`` in conf.yaml).
    sink : InstanceSink
        Durable storage for received instances; called from the association threads.
    peers : Sequence[PeerConfig]
        The calling AEs allowed to associate (``peers:``); empty: any calling AE.
    on_stored : callable, optional
        ``on_stored(study_instance_uid, sop_instance_uid)``, called after each instance stored
        for the first time (not for duplicates). Its errors are logged, never returned to the
        sender: the instance is already stored.
    on_association : callable, optional
        ``on_association(result, reason)`` per association request: ``("accepted", "")`` or
        ``("rejected", reason)`` (for the metrics).
    on_dropped : callable, optional
        ``on_dropped(reason)`` per connection dropped by the gate or aborted by the guarded
        DUL (timeout, oversized-pdu, tls-failed, too-many-pending, ...).
    audit : Audit, optional
        The audit trail (:mod:`dicom_node.audit`): associations, dropped connections,
        instances stored and refused.
    on_instance : callable, optional
        ``on_instance(sop_class_uid, status, seconds)`` per C-STORE answered (the metrics:
        instances by SOP class and status, and the ``receive`` stage).
    """

    def __init__(
        self,
        settings: NodeConfig,
        sink: InstanceSink,
        *,
        peers: Sequence[PeerConfig] = (),
        on_stored: Callable[[str, str], None] | None = None,
        on_association: Callable[[str, str], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
        audit: Audit | None = None,
        on_instance: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.peers = tuple(peers)
        self._ingest = Ingest(
            sink,
            max_image_pixels=settings.max_image_pixels,
            audit=audit,
            on_stored=on_stored,
        )
        self._on_association = on_association or (lambda result, reason: None)
        # Associations whose storage contexts were all refused, until they end (by id).
        self._refused_classes: dict[int, list[str]] = {}
        self._refused_lock = threading.Lock()
        self._on_dropped = on_dropped or (lambda reason: None)
        self._audit: Audit = audit or NullAudit()
        self._on_instance = on_instance or (lambda sop_class, status, seconds: None)
        self._lock = threading.Lock()
        self._ae: AE | None = None
        self._server: GuardedServer | None = None
        self._bound_port: int | None = None
        # AE title -> allowed addresses per listed peer (None: any address)
        self._allowed: dict[str, list[frozenset[str] | None]] = {}

    @property
    def port(self) -> int:
        """The bound port once started (``settings.port`` may be 0), else the configured one."""
        return self._bound_port if self._bound_port is not None else self.settings.port

    def start(self) -> None:
        """Listen in background threads; returns once the port is bound.

        Peer host names are resolved here, once: a name that does not resolve admits nobody.
        """
        settings = self.settings
        with self._lock:
            if self._server is not None:
                raise RuntimeError("the storage SCP is already started")
            self._allowed = _allowed_addresses(self.peers)
            ae = AE(ae_title=settings.ae_title)
            ae.maximum_associations = settings.max_associations
            # 0 ("unlimited") advertises the largest PDU the guarded DUL reads (16 MiB), so a
            # peer that follows what we told it is never aborted.
            ae.maximum_pdu_size = settings.max_pdu or MAX_UNLIMITED_PDU
            ae.acse_timeout = settings.acse_timeout_s
            ae.dimse_timeout = settings.dimse_timeout_s
            ae.network_timeout = settings.network_timeout_s
            # Our EVT_REQUESTED handler rejects a wrong called AE title first (and logs why);
            # pynetdicom's own check stays on as a second line.
            ae.require_called_aet = True
            ae.add_supported_context(
                _VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
            )
            for sop_class in STORAGE_SOP_CLASSES:
                ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
            handlers: list[Any] = [
                (evt.EVT_REQUESTED, self._handle_requested),
                (evt.EVT_REJECTED, self._handle_rejected),
                (evt.EVT_ACCEPTED, self._handle_accepted),
                (evt.EVT_C_STORE, self._handle_store),
                # Every end of a connection (released, aborted, or just closed), so that no
                # entry of _refused_classes outlives its association.
                (evt.EVT_CONN_CLOSE, self._handle_ended),
            ]
            gate = GateSettings(
                pre_association_timeout=settings.pre_association_timeout_s,
                max_pending=settings.max_pending_connections,
                max_pending_per_host=settings.max_pending_per_host,
                network_timeout=settings.network_timeout_s,
                max_dataset_bytes=settings.max_dataset_mb * 2**20,
                tls=server_context(settings.tls) if settings.tls is not None else None,
                on_dropped=self._dropped,
            )
            server = start_guarded_server(ae, (settings.host, settings.port), gate, handlers)
            self._ae, self._server = ae, server
            self._bound_port = int(server.server_address[1])
        log.info(
            "storage SCP %s listening on %s:%d%s (%d peer(s) allowed%s)",
            settings.ae_title,
            settings.host,
            self.port,
            " with DICOM TLS" if settings.tls is not None else "",
            len(self.peers),
            "" if self.peers else ": any calling AE",
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting associations, let running ones end, then abort what remains.

        Waits at most about ``timeout`` seconds for running associations. Safe to call twice,
        and before ``start``.
        """
        with self._lock:
            ae, server = self._ae, self._server
            self._ae = self._server = None
        if ae is None or server is None:
            return
        server.shutdown()  # closes the listening socket: new associations are refused
        deadline = time.monotonic() + timeout
        for assoc in server.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        remaining = server.active_associations
        if remaining:
            log.warning("aborting %d association(s) still running at stop", len(remaining))
        ae.shutdown()  # aborts the AE's remaining associations
        log.info("storage SCP %s stopped", self.settings.ae_title)

    # -- association negotiation -------------------------------------------------------------

    def _dropped(self, reason: str, address: str) -> None:
        self._on_dropped(reason)
        self._audit.record("connection-dropped", reason=reason, address=address)

    @staticmethod
    def _source(event: Event) -> Source:
        return Source("C-STORE", str(event.assoc.requestor.ae_title), event.assoc.requestor.address)

    def _refused(self, event: Event, status: int, reason: str, **uids: str) -> int:
        """Audit a C-STORE answered with a failure status, and return the status."""
        return self._ingest.refuse(self._source(event), status, reason, **uids).status

    def _handle_requested(self, event: Event) -> None:
        assoc = event.assoc
        request = _primitive(assoc.requestor.primitive)
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        address = assoc.requestor.address
        problem = self._rejection(calling, called, address)
        if problem is None:
            problem = self._over_host_limit(address)
        if problem is None:
            return
        result, source, diagnostic, reason = problem
        self._on_association("rejected", reason)
        self._audit.record(
            "association",
            result="rejected",
            reason=reason,
            calling_ae=calling,
            called_ae=called,
            address=address,
        )
        log.warning(
            "rejected association from %s at %s to %s: %s",
            calling,
            address,
            called,
            reason,
            extra={"calling_ae_title": calling, "called_ae_title": called},
        )
        assoc.acse.send_reject(result, source, diagnostic)
        # As pynetdicom does after its own rejections: wait until the reject is sent and the
        # peer has closed (bounded by the ARTIM timer) before the socket is shut down.
        assoc.kill()

    def _rejection(
        self, calling: str, called: str, address: str
    ) -> tuple[int, int, int, str] | None:
        """(result, source, diagnostic, reason) when an association must be rejected."""
        user = (_REJECTED_PERMANENT, _SERVICE_USER)
        if called != self.settings.ae_title.strip():
            return (*user, _CALLED_AE_NOT_RECOGNISED, "called AE title not recognised")
        if not self._allowed:
            return None
        hosts = self._allowed.get(calling)
        if hosts is None:
            return (*user, _CALLING_AE_NOT_RECOGNISED, "calling AE title not recognised")
        normalised = _normalise_address(address)
        if any(allowed is None or normalised in allowed for allowed in hosts):
            return None
        return (*user, _CALLING_AE_NOT_RECOGNISED, "calling AE title not allowed from this host")

    def _over_host_limit(self, address: str) -> tuple[int, int, int, str] | None:
        """Transient rejection when this host already holds its share of associations."""
        server = self._server
        if server is None:
            return None
        limit = min(self.settings.max_associations_per_host, self.settings.max_associations)
        # Established or negotiating associations of this host, this one included.
        held = sum(
            1
            for a in server.active_associations
            if _normalise_address(a.requestor.address) == _normalise_address(address)
        )
        if held <= limit:
            return None
        return (
            _REJECTED_TRANSIENT,
            _SERVICE_PROVIDER_PRESENTATION,
            _LOCAL_LIMIT_EXCEEDED,
            f"host holds {held - 1} association(s), its limit is {limit}",
        )

    def _handle_rejected(self, event: Event) -> None:
        # Rejections decided by pynetdicom itself (e.g. too many associations).
        answer = _primitive(event.assoc.acceptor.primitive)
        request = _primitive(event.assoc.requestor.primitive)
        limit = (answer.result, answer.result_source, answer.diagnostic) == (
            _REJECTED_TRANSIENT,
            _SERVICE_PROVIDER_PRESENTATION,
            _LOCAL_LIMIT_EXCEEDED,
        )
        reason = "local limit exceeded" if limit else "negotiation"
        self._on_association("rejected", reason)
        self._audit.record(
            "association",
            result="rejected",
            reason=reason,
            calling_ae=str(request.calling_ae_title).strip(),
            called_ae=str(request.called_ae_title).strip(),
            address=event.assoc.requestor.address,
        )
        log.warning(
            "rejected association from %s at %s: result 0x%02X, source 0x%02X, reason 0x%02X",
            str(request.calling_ae_title).strip(),
            event.assoc.requestor.address,
            answer.result,
            answer.result_source,
            answer.diagnostic,
        )

    def _handle_accepted(self, event: Event) -> None:
        self._on_association("accepted", "")
        calling = event.assoc.requestor.ae_title
        self._audit.record(
            "association",
            result="accepted",
            calling_ae=str(calling).strip(),
            called_ae=str(event.assoc.acceptor.ae_title).strip(),
            address=event.assoc.requestor.address,
            tls=self.settings.tls is not None,
        )
        rejected = event.assoc.rejected_contexts
        # SCUs such as storescu propose every storage class: only refusals of the classes we
        # store (a transfer syntax we cannot read) deserve a line each.
        ours = [cx for cx in rejected if cx.abstract_syntax in STORAGE_SOP_CLASSES]
        if len(rejected) > len(ours):
            log.debug(
                "association from %s: %d presentation context(s) for other SOP classes rejected",
                calling,
                len(rejected) - len(ours),
            )
        for context in ours:
            log.info(
                "rejected presentation context %s (%s) from %s: %s",
                context.abstract_syntax,
                ", ".join(context.transfer_syntax),
                calling,
                context.status,
            )
        # A peer whose image is of a class the node does not take never reaches a handler
        # (a CT over C-STORE is refused at negotiation): an association that proposed such
        # classes and stores nothing is recorded as a problem when it ends, with the classes.
        others = [
            str(cx.abstract_syntax)
            for cx in rejected
            if cx.abstract_syntax not in STORAGE_SOP_CLASSES
            and _is_storage(str(cx.abstract_syntax))
        ]
        if others:
            with self._refused_lock:
                self._refused_classes[id(event.assoc)] = others

    def _handle_ended(self, event: Event) -> None:
        with self._refused_lock:
            others = self._refused_classes.pop(id(event.assoc), None)
        if not others:  # none refused, or something was stored
            return
        # Image classes first: a modality's image is what an administrator looks for.
        names = sorted({UID(uid).name for uid in others}, key=lambda n: ("Image" not in n, n))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self._ingest.note(
            self._source(event),
            NOT_RADIOGRAPH,
            f"nothing stored; proposed SOP class(es) the node does not take: {shown}",
            SOP_CLASS_NOT_SUPPORTED,
        )

    # -- C-STORE -----------------------------------------------------------------------------

    def _handle_store(self, event: Event) -> int:
        started = time.perf_counter()
        with self._refused_lock:  # it sends what the node takes: the refusals were no problem
            self._refused_classes.pop(id(event.assoc), None)
        status = UNABLE_TO_PROCESS
        try:
            status = self._store(event)
            return status
        finally:
            sop_class = str(event.context.abstract_syntax)
            self._on_instance(sop_class, status, time.perf_counter() - started)

    def _store(self, event: Event) -> int:
        calling = event.assoc.requestor.ae_title
        affected = loggable_uid(getattr(event.request, "AffectedSOPInstanceUID", ""))
        syntax = UID(str(event.context.transfer_syntax))
        raw = getattr(event.request, "DataSet", None)
        if syntax == DeflatedExplicitVRLittleEndian and raw is not None:
            bomb = check_deflate(raw, self.settings.max_dataset_mb * 2**20)
            if bomb is not None:
                log.warning(
                    "C-STORE %r from %s: %s; answering 0x%04X",
                    affected,
                    calling,
                    bomb.reason,
                    bomb.status,
                )
                return self._refused(
                    event, bomb.status, bomb.reason, affected_sop_instance_uid=affected
                )
        try:
            dataset = event.dataset
            sop_class_uid = uid_of(dataset, "SOPClassUID")
        except Exception as error:
            # Not the message: a decoding error may quote element values.
            log.warning(
                "C-STORE %r from %s: data set cannot be decoded (%s); answering 0x%04X",
                affected,
                calling,
                type(error).__name__,
                CANNOT_UNDERSTAND,
            )
            return self._refused(
                event, CANNOT_UNDERSTAND, "undecodable", affected_sop_instance_uid=affected
            )

        abstract_syntax = str(event.context.abstract_syntax)
        if sop_class_uid != abstract_syntax:
            log.warning(
                "C-STORE %r from %s: SOP Class UID %r does not match the presentation "
                "context %s; answering 0x%04X",
                affected,
                calling,
                loggable_uid(sop_class_uid),
                abstract_syntax,
                SOP_CLASS_MISMATCH,
            )
            return self._refused(
                event,
                SOP_CLASS_MISMATCH,
                "SOP class does not match the context",
                affected_sop_instance_uid=affected,
                sop_class_uid=loggable_uid(sop_class_uid),
            )

        outcome = self._ingest.accept(
            dataset,
            lambda: bytes(event.encoded_dataset(include_meta=True)),
            syntax=syntax,
            source=self._source(event),
        )
        return outcome.status


def _is_storage(sop_class_uid: str) -> bool:
    """A storage SOP class (by pydicom's UID dictionary: "CT Image Storage", ...)."""
    return "Storage" in UID(sop_class_uid).name


def _primitive(primitive: A_ASSOCIATE | None) -> A_ASSOCIATE:
    if primitive is None:  # pynetdicom sets both before the association events fire
        raise RuntimeError("association event without its A-ASSOCIATE primitive")
    return primitive


def _normalise_address(address: str) -> str:
    """Canonical form of an IP address (IPv4-mapped IPv6 becomes IPv4); others unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _resolve(host: str) -> frozenset[str]:
    """The addresses a peer's host (an IP address or a name) stands for."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return frozenset({_normalise_address(host)})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as error:
        log.warning("peer host %r does not resolve (%s): it is not allowed", host, error)
        return frozenset()
    return frozenset(_normalise_address(str(info[4][0])) for info in infos)


def _allowed_addresses(peers: Sequence[PeerConfig]) -> dict[str, list[frozenset[str] | None]]:
    allowed: dict[str, list[frozenset[str] | None]] = {}
    for peer in peers:
        hosts = None if peer.host is None else _resolve(peer.host)
        allowed.setdefault(peer.ae_title.strip(), []).append(hosts)
    return allowed
