"""DICOM TLS on the SCP and the SCU over real TLS on 127.0.0.1: dcmtk's echoscu/storescu
+tls, pynetdicom with an ssl.SSLContext, client certificates, old protocol versions, and a
silent TLS client that must not hold up anybody else's handshake."""

# ruff: noqa: F811  (fixtures imported from test_scp are redefined as parameters)

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.config import DestinationConfig, NodeConfig, TlsConfig
from dicom_node.errors import ConfigError
from dicom_node.receive import StorageScp
from dicom_node.send.scu import send_files
from dicom_node.tls import client_context, server_context
from tests.conftest import require_tool
from tests.factories import MemorySink
from tests.net.test_scp import (  # noqa: F401  (fixtures)
    VERIFICATION,
    dx_file,
    phantoms,
    sink,
    start_scp,
    wait_for,
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=root,
    )  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=root,
        )  # fmt: skip
        (root / f"{name}.ext").write_text(extension + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=root,
        )  # fmt: skip
    return root


def node_tls(pki: Path, **extra: object) -> TlsConfig:
    return TlsConfig(certificate=pki / "server.pem", private_key=pki / "server.key", **extra)  # type: ignore[arg-type]


def client_tls(pki: Path, certificate: bool = True) -> TlsConfig:
    if certificate:
        return TlsConfig(
            certificate=pki / "client.pem",
            private_key=pki / "client.key",
            ca_certificates=pki / "ca.pem",
        )
    return TlsConfig(ca_certificates=pki / "ca.pem")


def tls_echo(port: int, context: ssl.SSLContext) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE", tls_args=(context, "localhost"))
    try:
        return bool(assoc.is_established and int(assoc.send_c_echo().Status) == 0)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def dcmtk(tool: str, pki: Path, port: int, *args: str, certificate: bool = True) -> int:
    identity = ["+tls", str(pki / "client.key"), str(pki / "client.pem")]
    command = [
        require_tool(tool),
        *(identity if certificate else ["+tla"]),
        "+cf",
        str(pki / "ca.pem"),
        "-aec",
        "ORTHONODE",
        "-to",
        "10",
        "127.0.0.1",
        str(port),
        *args,
    ]
    return subprocess.run(command, capture_output=True, timeout=60).returncode


@pytest.fixture
def tls_scp(start_scp: Callable[..., StorageScp], sink: MemorySink, pki: Path) -> StorageScp:
    return start_scp(sink, tls=node_tls(pki, ca_certificates=pki / "ca.pem"))


def test_dcmtk_echoscu_and_storescu_over_tls(
    tls_scp: StorageScp, sink: MemorySink, pki: Path, dx_file: Path
) -> None:
    assert dcmtk("echoscu", pki, tls_scp.port) == 0
    assert dcmtk("storescu", pki, tls_scp.port, str(dx_file)) == 0
    assert len(sink.instances) == 1


def test_plain_dicom_to_a_tls_port_gets_nothing(tls_scp: StorageScp) -> None:
    ae = AE(ae_title="PLAIN")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", tls_scp.port, ae_title="ORTHONODE")
    assert not assoc.is_established
    ae.shutdown()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_tls_versions_are_refused(tls_scp: StorageScp, pki: Path) -> None:
    """The server's floor is TLS 1.2 (whatever the client's OpenSSL would allow), and a client
    offering at most TLS 1.1 gets no handshake."""
    assert server_context(node_tls(pki)).minimum_version == ssl.TLSVersion.TLSv1_2
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki / "ca.pem")
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with (
        socket.create_connection(("127.0.0.1", tls_scp.port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, OSError)),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.do_handshake()
    assert tls_echo(tls_scp.port, client_context(client_tls(pki)))


def test_a_client_certificate_is_required_when_configured(
    start_scp: Callable[..., StorageScp], sink: MemorySink, pki: Path
) -> None:
    scp = start_scp(
        sink, tls=node_tls(pki, ca_certificates=pki / "ca.pem", require_client_certificate=True)
    )
    assert dcmtk("echoscu", pki, scp.port, certificate=False) != 0
    assert not tls_echo(scp.port, client_context(client_tls(pki, certificate=False)))
    assert dcmtk("echoscu", pki, scp.port) == 0
    assert tls_echo(scp.port, client_context(client_tls(pki)))


def test_a_silent_tls_client_does_not_block_other_handshakes(
    start_scp: Callable[..., StorageScp], sink: MemorySink, pki: Path
) -> None:
    """pynetdicom alone runs the handshake in its accept loop: one connection that never
    sends a ClientHello blocks every other peer. Here 10 of them change nothing."""
    scp = start_scp(sink, tls=node_tls(pki), pre_association_timeout_s=3.0)
    silent = [socket.create_connection(("127.0.0.1", scp.port), timeout=5) for _ in range(10)]
    try:
        started = time.perf_counter()
        assert tls_echo(scp.port, client_context(client_tls(pki, certificate=False)))
        assert time.perf_counter() - started < 1.0
    finally:
        for s in silent:
            s.close()


def test_the_sender_speaks_tls_and_checks_the_server(
    tls_scp: StorageScp, sink: MemorySink, pki: Path, dx_file: Path, tmp_path: Path
) -> None:
    destination = DestinationConfig(
        ae_title="ORTHONODE",
        host="127.0.0.1",
        port=tls_scp.port,
        tls=TlsConfig(ca_certificates=pki / "ca.pem", server_name="localhost"),
    )
    assert send_files(destination, [dx_file], "SENDER") == {dx_file: None}
    assert len(sink.instances) == 1
    # A server whose certificate does not carry the expected name is not sent to.
    wrong = destination.model_copy(
        update={"tls": TlsConfig(ca_certificates=pki / "ca.pem", server_name="pacs.example")}
    )
    [problem] = send_files(wrong, [dx_file], "SENDER").values()
    assert problem is not None and "association" in problem


def test_tls_configuration_is_checked(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        TlsConfig(certificate=pki / "server.pem")
    with pytest.raises(ValueError, match="needs a certificate"):
        NodeConfig(tls=TlsConfig(ca_certificates=pki / "ca.pem"))
    with pytest.raises(ConfigError, match="cannot load"):
        client_context(TlsConfig(ca_certificates=tmp_path / "missing.pem"))
