"""Destination types come from one registry (dicom_node/send/transport.py): a new type is one
module that registers its transport, and one entry in conf.yaml's ``destinations:``. Here the
module is this test's toy ``test-file`` type, which copies each output into a folder; the
node's own config validation and sender use it as they use C-STORE and STOW-RS."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.config import DestinationConfig, SendConfig, load_config
from dicom_node.errors import ConfigError
from dicom_node.send import Sender
from dicom_node.send.failures import unreadable
from dicom_node.send.scu import DimseTransport
from dicom_node.send.stow import StowTransport
from dicom_node.send.transport import (
    DestinationType,
    OnEach,
    Results,
    destination_type,
    destination_types,
    register,
    unregister,
)
from dicom_node.store import Spool
from tests.factories import queue_outputs

# -- the new type's module: a transport, its check, its registration --------------------------


def _folder(destination: DestinationConfig) -> Path:
    assert destination.url is not None
    return Path(destination.url.removeprefix("file://"))


def check_folder(destination: DestinationConfig) -> None:
    """What a test-file destination needs: url: file:///a/folder."""
    if not (destination.url or "").startswith("file:///"):
        raise ValueError("a test-file destination needs url: file:///a/folder")


class FolderTransport:
    """Copies each output to ``{folder}/{SOP Instance UID}.dcm``."""

    def __init__(
        self, destination: DestinationConfig, policy: SendConfig, calling_ae_title: str
    ) -> None:
        self.folder = _folder(destination)

    def send(self, paths: Sequence[Path], on_each: OnEach | None = None) -> Results:
        results: Results = {}
        for path in paths:
            try:
                uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
            except Exception as error:
                results[path] = unreadable(path, error)  # the node's rule: dead-lettered
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.folder / f"{uid}.dcm")
                results[path] = None
            if on_each is not None:
                on_each(path, results[path])
        return results


TEST_FILE = DestinationType("test-file", open=FolderTransport, check=check_folder)


@pytest.fixture
def test_file_type() -> Iterator[DestinationType]:
    """The toy type, registered for one test (and the registry as it was afterwards)."""
    register(TEST_FILE)
    yield TEST_FILE
    unregister(TEST_FILE.name)


# -- helpers ----------------------------------------------------------------------------------


def _output(path: Path) -> str:
    """A small DICOM file standing in for an output; returns its SOP Instance UID."""
    dataset = Dataset()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = uid = generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return uid


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


# -- tests ------------------------------------------------------------------------------------


def test_a_registered_type_is_one_config_entry_and_the_sender_uses_it(
    test_file_type: DestinationType, tmp_path: Path, spool: Spool
) -> None:
    archive = tmp_path / "archive"
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"destinations:\n  - {{name: archive, type: test-file, url: 'file://{archive}'}}\n"
    )
    config = load_config(conf)
    [destination] = config.destinations
    assert destination.type == "test-file"
    good, damaged = tmp_path / "sr.dcm", tmp_path / "damaged.dcm"
    uid = _output(good)
    damaged.write_bytes(b"not DICOM")
    queue_outputs(spool, "1.2.3", [good, damaged], ["archive"])

    sender = Sender(spool, config.destinations, config.send, config.node.ae_title)
    try:
        assert isinstance(sender.transports["archive"], FolderTransport)
        assert sender.step() == 2
    finally:
        sender.close()
    assert (archive / f"{uid}.dcm").read_bytes() == good.read_bytes()
    # The damaged one: the node's failure rules apply to the new type's answers too.
    assert spool.outbox_counts() == {"sent": 1, "dead": 1}
    [dead] = spool.dead_letters()
    assert dead.path == damaged and "cannot read damaged.dcm" in (dead.last_error or "")


def test_the_registry_is_where_the_config_takes_its_types_from(
    test_file_type: DestinationType, tmp_path: Path
) -> None:
    assert set(destination_types()) >= {"dimse", "dicomweb", "test-file"}
    with pytest.raises(ValueError, match="a test-file destination needs url: file:///"):
        DestinationConfig(name="archive", type="test-file", url="http://x/")
    unregister("test-file")
    with pytest.raises(ValueError, match="unknown destination type 'test-file': use one of"):
        DestinationConfig(name="archive", type="test-file", url=f"file://{tmp_path}")
    register(TEST_FILE)  # as the fixture left it, for its teardown


def test_an_unknown_type_is_named_with_the_known_ones(tmp_path: Path) -> None:
    conf = tmp_path / "conf.yaml"
    conf.write_text("destinations:\n  - {name: x, type: dicomwb, url: 'http://x/web'}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(conf)
    expected = "unknown destination type 'dicomwb': use one of dicomweb, dimse"
    assert f"destinations.0.type: Value error, {expected}" in str(raised.value)


def test_a_name_is_registered_once() -> None:
    def other(destination: DestinationConfig, policy: SendConfig, ae: str) -> FolderTransport:
        return FolderTransport(destination, policy, ae)

    assert register(destination_type("dimse")) is destination_type("dimse")  # the same: fine
    with pytest.raises(ValueError, match="'dimse' is already registered"):
        register(DestinationType("dimse", open=other))
    assert destination_type("dimse").open is DimseTransport


def test_the_built_in_types_check_what_they_always_checked() -> None:
    with pytest.raises(ValueError, match="a dimse destination needs ae_title and host"):
        DestinationConfig(name="pacs", ae_title="PACS")
    with pytest.raises(ValueError, match="url is for type: dicomweb destinations"):
        DestinationConfig(name="pacs", ae_title="PACS", host="pacs", url="http://pacs/web")
    with pytest.raises(ValueError, match="a dicomweb destination needs url"):
        DestinationConfig(name="web", type="dicomweb", url="ftp://pacs/web")
    with pytest.raises(ValueError, match="no user or password in the URL"):
        DestinationConfig(name="web", type="dicomweb", url="http://me:secret@pacs/web")
    with pytest.raises(ValueError, match="give token_file or token_env, not both"):
        DestinationConfig(
            name="web", type="dicomweb", url="http://pacs/web", token_file=Path("t"), token_env="T"
        )
    with pytest.raises(ValueError, match="password_env needs username"):
        DestinationConfig(name="web", type="dicomweb", url="http://pacs/web", password_env="P")


def test_the_sender_opens_each_destination_by_its_type(spool: Spool) -> None:
    pacs = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)
    web = DestinationConfig(name="web", type="dicomweb", url="http://127.0.0.1:1/web")
    sender = Sender(spool, [pacs, web], SendConfig(dimse_timeout_s=7.0), "ORTHONODE")
    try:
        dimse, stow = sender.transports["pacs"], sender.transports["web"]
        assert isinstance(dimse, DimseTransport) and dimse.timeout_s == 7.0
        assert dimse.calling_ae_title == "ORTHONODE"
        assert isinstance(stow, StowTransport) and stow.destination == web
    finally:
        sender.close()


def test_a_transport_that_raises_is_retried_not_lost(
    test_file_type: DestinationType, tmp_path: Path, spool: Spool
) -> None:
    """Whatever a transport raises, its outputs back off and stay queued (the sender's rule,
    the same for every type)."""
    output = tmp_path / "sr.dcm"
    _output(output)
    queue_outputs(spool, "1.2.3", [output], ["archive"])
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")  # mkdir raises FileExistsError
    destination = DestinationConfig(name="archive", type="test-file", url=f"file://{blocked}")
    sender = Sender(spool, [destination], SendConfig(backoff_initial_s=60), "ORTHONODE")
    try:
        assert sender.step() == 1
    finally:
        sender.close()
    assert spool.outbox_counts() == {"pending": 1}
    [item] = spool.outbox_for("1.2.3", "knee")  # queue_outputs queues as task knee
    assert (item.last_error or "").startswith("send failed: FileExistsError")
