"""Property-based fuzzing (hypothesis) of what comes after ingest: decode → display →
classifier input, on mutated phantoms that the C-STORE check lets through.

Ingest itself (statuses, durable writes, logs) is fuzzed through the real ``Ingest.accept`` and
the real SCP in ``test_fuzz_ingest.py``; this file keeps the downstream invariant: an image the
node accepted becomes a finite classifier input or the study's recorded failure.

The chain is the node's own: the bytes a C-STORE would carry are decoded by pydicom, checked
by the SCP's :func:`~dicom_node.receive.validate.check_image`, and, when accepted, displayed
and made into a classifier input. Whatever the mutation, each example must end in one of
three ways within its deadline: refused at C-STORE (a :class:`Refusal`), undecodable (the SCP
answers 0xC210), or a finite input tensor of the right shape; or the read stage's own error
(:class:`InferenceError`, which the pipeline records as the study's failure). Anything else is
a crash; an example over the deadline is a hang.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.errors import InferenceError
from dicom_node.preprocess import build_preprocessing, display_image
from dicom_node.receive.validate import check_image
from tests.conftest import make_set

pytestmark = pytest.mark.slow

SIZE = 64


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = make_set(
        tmp_path_factory.mktemp("fuzz"), "k", task="knee", patients=1, seed=9, rows=128, cols=128
    )
    return next((folder / "dicom").rglob("*.dcm")).read_bytes()


def ingest(data: bytes) -> str:
    """What the node does with bytes received as a data set: the outcome's name."""
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
        refusal = check_image(ds, syntax=ds.file_meta.TransferSyntaxUID, max_pixels=4_000_000)
    except Exception:
        return "undecodable"  # the SCP answers 0xC210
    if refusal is not None:
        return "refused"
    try:
        try:
            display = display_image(ds)
        except Exception as error:  # Predictor.prepare's wrapping
            raise InferenceError(f"cannot decode: {error}") from error
        tensor, _ = build_preprocessing(SIZE, 1, "standardise")(display)
    except InferenceError:
        return "recorded as failed"
    assert tensor.shape == (1, SIZE, SIZE)
    assert torch.isfinite(tensor).all(), "non-finite classifier input"
    return "analysed"


FIELDS = {
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "HighBit": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(0, 5),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "", "XYZ"]
    ),
    "WindowCenter": st.floats(-1e6, 1e6) | st.just(float("nan")),
    "WindowWidth": st.floats(-1e6, 1e6) | st.just(float("nan")),
    "RescaleSlope": st.floats(-1e3, 1e3) | st.just(float("nan")),
    "RescaleIntercept": st.floats(-1e6, 1e6) | st.just(float("nan")),
}


@settings(
    max_examples=120,
    deadline=5000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    changes=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
    )
)
def test_mutated_attributes_never_crash(phantom: bytes, changes: dict[str, object]) -> None:
    ds = pydicom.dcmread(BytesIO(phantom))
    for keyword, value in changes.items():
        if keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
            value = f"{value:.6g}"[:16]
        setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert ingest(out.getvalue()) in {"undecodable", "refused", "recorded as failed", "analysed"}


@settings(
    max_examples=150,
    deadline=5000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cuts=st.lists(
        st.tuples(st.floats(0, 1), st.sampled_from(["flip", "drop", "insert", "truncate"])),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_mutated_bytes_never_crash(
    phantom: bytes, cuts: list[tuple[float, str]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    data = bytearray(phantom)
    for where, how in cuts:
        if len(data) <= 133:
            break
        at = 132 + int(where * (len(data) - 133))  # after the preamble and "DICM"
        if how == "flip":
            data[at] ^= 1 << int(rng.integers(8))
        elif how == "drop":
            del data[at : at + int(rng.integers(1, 64))]
        elif how == "insert":
            data[at:at] = rng.bytes(int(rng.integers(1, 64)))
        else:
            del data[at:]
    assert ingest(bytes(data)) in {"undecodable", "refused", "recorded as failed", "analysed"}


def test_the_unmutated_phantom_is_analysed(phantom: bytes) -> None:
    assert ingest(phantom) == "analysed"


def test_fuzz_budget_is_small(phantom: bytes, tmp_path: Path) -> None:
    """The phantom stays small, so that 270 examples run in seconds on CI."""
    assert len(phantom) < 64 * 1024
