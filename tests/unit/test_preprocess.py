"""The preprocessing as one MONAI composition: each transform on tiny arrays with known answers,
the card's record of it, and the same DICOM file giving the same tensor through the training
loader and through the node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from monai.data.meta_obj import get_track_meta
from monai.transforms import SpatialPad
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from torch import nn

from dicom_node.domain import InstanceRef, RegionOfInterest, RoutedView
from dicom_node.errors import BundleError
from dicom_node.infer import Predictor
from dicom_node.models.bundle import Bundle, Card, load_bundle, load_card
from dicom_node.preprocess import (
    DisplayImage,
    LocaliserCrop,
    Preprocessing,
    ResizeLongest,
    RoiSettings,
    Standardise,
    build_preprocessing,
    card_preprocessing,
    crop_square,
    fitted_shape,
    preprocessing_record,
    resize_pad,
    to_model_input,
)
from tests.conftest import make_set
from train.data import Sample, load_images
from train.roi import crop_inputs, locate_all

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
TASKS = ("knee", "hip", "spine")


# --- each transform, by hand -------------------------------------------------------------------


def _dataset(pixels: np.ndarray, **tags: object) -> FileDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


_RAMP = np.array([[0, 1024], [2048, 4095]])


def test_display_scales_the_window_to_unit_range() -> None:
    # Inside the window the VOI LUT is linear: the displayed image is the values' min–max range.
    image = DisplayImage()(_dataset(_RAMP, WindowCenter=2048, WindowWidth=4096))
    assert image.dtype == np.float32
    assert np.allclose(image, _RAMP / 4095, atol=1e-6)


def test_display_inverts_monochrome1() -> None:
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    mono2 = DisplayImage()(_dataset(_RAMP, **window))
    mono1 = DisplayImage()(_dataset(_RAMP, PhotometricInterpretation="MONOCHROME1", **window))
    assert np.array_equal(mono1, 1.0 - mono2)
    assert mono1[0, 0] == 1.0 and mono1[1, 1] == 0.0  # MONOCHROME1: low values are bright


def test_display_applies_the_rescale_before_the_window() -> None:
    # Values 2 × stored − 100 in a window moved the same way: the same displayed image.
    plain = DisplayImage()(_dataset(_RAMP, WindowCenter=2048, WindowWidth=4096))
    rescaled = DisplayImage()(
        _dataset(_RAMP, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=3996, WindowWidth=8192)
    )
    assert np.allclose(plain, rescaled, atol=1e-6)


def test_display_without_a_window_clips_to_the_percentiles() -> None:
    pixels = np.full((16, 16), 1000)
    pixels[::4, ::4] = np.arange(16).reshape(4, 4) * 100 + 1000  # the pixels sampled
    image = DisplayImage(percentiles=(0, 100))(_dataset(pixels))
    assert image[0, 0] == 0.0 and image[12, 12] == 1.0  # 1000 → 0, 2500 → 1
    assert image[4, 0] == pytest.approx(400 / 1500)


def test_area_resize_averages_and_bilinear_enlarges() -> None:
    image = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert torch.equal(ResizeLongest(2)(image)[0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    row = torch.tensor([[[0.0, 1.0]]])  # 1 × 2 → 2 × 4, align_corners=False
    enlarged = ResizeLongest(4)(row)[0]
    assert torch.allclose(enlarged, torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 2))


def test_resize_keeps_the_aspect_and_never_rounds_to_zero() -> None:
    assert fitted_shape(300, 150, 100) == (100, 50)
    assert fitted_shape(1, 1000, 64) == (1, 64)
    assert ResizeLongest(100)(torch.zeros(1, 300, 150)).shape == (1, 100, 50)


def test_centre_pad_puts_the_odd_pixel_after() -> None:
    padded = SpatialPad((4, 4), method="symmetric", mode="constant")(torch.ones(1, 1, 1))
    assert padded.shape == (1, 4, 4) and padded.sum() == 1 and padded[0, 1, 1] == 1
    square = resize_pad(np.ones((3, 6), dtype=np.float32), 4)  # → 2 × 4, rows 1 and 2
    assert np.array_equal(square.sum(axis=1), [0, 4, 4, 0])


def test_standardise_uses_the_sample_deviation_with_a_floor() -> None:
    image = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    expected = (image - 2.5) / (5 / 3) ** 0.5
    assert torch.allclose(Standardise()(image), expected)
    assert torch.equal(Standardise()(torch.full((1, 2, 2), 7.0)), torch.zeros(1, 2, 2))


@pytest.mark.parametrize(
    ("normalisation", "channels", "value", "expected"),
    [
        ("unit", 1, 0.75, [1.0]),
        (
            "imagenet",
            3,
            0.5,
            [
                (0.5 - m) / s
                for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)
            ],
        ),
        ("imagenet", 1, 0.449, [0.0]),
    ],
)
def test_channels_and_normalisation(
    normalisation: str, channels: int, value: float, expected: list[float]
) -> None:
    tensor = to_model_input(np.full((8, 8), value, dtype=np.float32), 8, channels, normalisation)
    assert tensor.shape == (channels, 8, 8) and type(tensor) is torch.Tensor
    assert torch.allclose(tensor[:, 4, 4], torch.tensor(expected), atol=1e-6)


def test_unknown_normalisation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown normalisation 'z'"):
        Preprocessing(64, 1, "z")


def test_crop_is_zero_past_the_edges_and_needs_a_localiser_or_a_region() -> None:
    image = torch.arange(1, 17, dtype=torch.float32).reshape(1, 4, 4)
    crop = LocaliserCrop(None, 0.5, 0.1)  # type: ignore[arg-type]
    out, region = crop(image, RegionOfInterest(top=-1, left=2, side=3))
    assert region == RegionOfInterest(-1, 2, 3)
    assert torch.equal(out[0], torch.tensor([[0.0, 0, 0], [3, 4, 0], [7, 8, 0]]))
    assert np.array_equal(crop_square(image[0].numpy(), region), out[0].numpy())
    with pytest.raises(ValueError, match="needs a localiser"):
        crop(image)
    with pytest.raises(ValueError, match="no region of interest"):
        build_preprocessing(8, 1, "unit")(np.zeros((8, 8), np.float32), region)


def test_the_displayed_image_is_not_changed_and_meta_tracking_is_restored() -> None:
    display = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    before = display.copy()
    tensor, region = build_preprocessing(32, 1, "standardise")(display)  # no resize, no pad
    assert region is None and np.array_equal(display, before)
    assert not np.shares_memory(tensor.numpy(), display)
    assert get_track_meta()


def _reference_input(display: np.ndarray, size: int, channels: int, normalisation: str):  # type: ignore[no-untyped-def]
    """Steps 3–4 as the node computed them before MONAI (torch interpolate and pad)."""
    rows, cols = display.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    source = torch.from_numpy(display)[None, None]
    kwargs = {"mode": "area"} if scale < 1 else {"mode": "bilinear", "align_corners": False}
    resized = F.interpolate(source, size=(new_rows, new_cols), **kwargs)[0, 0]
    out = torch.zeros((size, size))
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = resized
    x = out[None].expand(channels, size, size).clone()
    if normalisation == "standardise":
        return (x - x.mean()) / x.std().clamp_min(1e-3)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.mark.parametrize(
    ("shape", "size", "channels", "normalisation"),
    [
        ((300, 200), 128, 1, "standardise"),
        ((90, 120), 256, 3, "imagenet"),
        ((64, 64), 64, 1, "standardise"),
    ],
)
def test_the_composition_equals_the_plain_torch_path(
    shape: tuple[int, int], size: int, channels: int, normalisation: str
) -> None:
    display = np.random.default_rng(1).random(shape, dtype=np.float32)
    tensor = to_model_input(display, size, channels, normalisation)
    reference = _reference_input(display, size, channels, normalisation)
    assert (tensor - reference).abs().max() <= 1e-6


# --- the card's record --------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_the_shipped_cards_record_what_the_node_builds(task: str) -> None:
    card = load_card(WEIGHTS / task)
    raw = json.loads((WEIGHTS / task / "card.json").read_text())
    assert raw["preprocessing"] == preprocessing_record(
        card.input_size, card.channels, card.normalisation, card.roi
    )
    names = [step["transform"] for step in raw["preprocessing"]]
    assert names == [
        "DisplayImage",
        "EnsureChannelFirst",
        "LocaliserCrop",
        "ResizeLongest",
        "SpatialPad",
        "RepeatChannel",
        "Standardise",
        "EnsureType",
    ]
    assert card_preprocessing(card).record == raw["preprocessing"]


def _card_fields(task: str = "hip") -> dict[str, object]:
    fields = json.loads((WEIGHTS / task / "card.json").read_text())
    fields.pop("preprocessing")
    return fields


def test_a_card_without_a_record_derives_it_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    fields = _card_fields()
    card = Card.model_validate(fields)
    assert card.preprocessing is not None
    assert [s.model_dump() for s in card.preprocessing] == preprocessing_record(
        card.input_size, card.channels, card.normalisation, card.roi
    )
    assert Card.model_validate({**fields, "roi": None}).preprocessing[2].transform == (  # type: ignore[index]
        "ResizeLongest"
    )
    record = [s.model_dump() for s in card.preprocessing]
    record[-2]["args"]["min_std"] = 0.01  # a bundle trained with another preprocessing
    (tmp_path / "card.json").write_text(json.dumps({**fields, "preprocessing": record}))
    with pytest.raises(BundleError, match="recorded preprocessing is not the one"):
        load_card(tmp_path)
    with pytest.raises(ValueError, match="unknown normalisation"):
        Card.model_validate({**fields, "normalisation": "zscore"})


# --- the same file through training and the node -----------------------------------------------


def _variants(root: Path, task: str) -> list[Path]:
    """Phantom views: as generated (windowed, MONOCHROME2), MONOCHROME1, and the first with a
    rescale slope and intercept, without its window, and with both changes."""
    mono2 = sorted(
        make_set(root, f"{task}-2", task=task, patients=1, seed=31, rows=320).rglob("*.dcm")
    )
    mono1 = sorted(
        make_set(
            root, f"{task}-1", task=task, patients=1, seed=32, cols=300, photometric="MONOCHROME1"
        ).rglob("*.dcm")
    )
    files = [*mono2, *mono1]
    changes: dict[str, dict[str, str | None]] = {
        "rescaled": {"RescaleSlope": "2", "RescaleIntercept": "-100"},
        "unwindowed": {"WindowCenter": None, "WindowWidth": None},
        "both": {
            "RescaleSlope": "0.5",
            "RescaleIntercept": "10",
            "WindowCenter": None,
            "WindowWidth": None,
        },
    }
    for name, tags in changes.items():
        ds = pydicom.dcmread(mono2[0])
        for key, value in tags.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.SOPInstanceUID = generate_uid()
        files.append(root / f"{task}-{name}.dcm")
        ds.save_as(files[-1])
    return files


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("variants")
    return {task: _variants(root, task) for task in TASKS}


def _training(
    card: Card, localiser: nn.Module | None, files: list[Path]
) -> tuple[torch.Tensor, list[RegionOfInterest | None]]:
    """The classifier inputs as ``python -m train fit`` makes them (train/protocol.py)."""
    samples = [
        Sample(
            path=f,
            patient_id="p",
            study_instance_uid="s",
            sop_instance_uid=f.stem,
            view="AP",
            label_index=0,
        )
        for f in files
    ]
    roi = card.roi if localiser is not None else None
    loaded = load_images(
        samples,
        size=card.input_size,
        channels=card.channels,
        normalisation=card.normalisation,
        roi_size=roi.input_size if roi is not None else None,
    )
    if roi is None:
        assert loaded.inputs is not None
        return loaded.inputs, [None] * len(files)
    assert loaded.displays is not None and loaded.whole is not None
    shapes = [d.shape for d in loaded.displays]
    regions = locate_all(localiser, loaded.whole, shapes, roi.threshold, roi.margin)  # type: ignore[arg-type]
    inputs = crop_inputs(
        loaded.displays, regions, card.input_size, card.channels, card.normalisation, roi
    )
    return inputs, list(regions)


def _bundles(task: str) -> dict[str, Bundle]:
    shipped = load_bundle(WEIGHTS / task)
    fields = _card_fields(task)
    whole: dict[str, dict[str, object]] = {
        "standardise": {"roi": None},
        "imagenet-3": {"roi": None, "channels": 3, "normalisation": "imagenet", "input_size": 200},
        "unit": {"roi": None, "normalisation": "unit", "input_size": 512},
    }
    bundles = {"localiser": shipped}
    for name, changes in whole.items():
        card = Card.model_validate({**fields, **changes})
        bundles[name] = Bundle(path=shipped.path, card=card, model=nn.Identity())
    return bundles


@pytest.mark.parametrize("task", TASKS)
def test_training_and_the_node_give_identical_tensors(
    task: str, views: dict[str, list[Path]]
) -> None:
    """Bit for bit (torch.equal): both run the same transform objects on the same decoded
    pixels in the same process, so there is no tolerance to allow. Only the localiser runs in
    batches of several images in training and of one in the node; the regions are compared."""
    files = views[task]
    for name, bundle in _bundles(task).items():
        inputs, regions = _training(bundle.card, bundle.localiser, files)
        predictor = Predictor({task: bundle})
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            instance = InstanceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), "s", "r", path)
            prepared = predictor.prepare(RoutedView(instance, task, "AP"))
            assert prepared.region == regions[i], (name, path.name)
            assert type(prepared.tensor) is torch.Tensor
            assert prepared.tensor.dtype == inputs[i].dtype == torch.float32
            assert torch.equal(prepared.tensor, inputs[i]), (name, path.name)
        if name == "localiser":  # the crop is exercised (a variant may be missed: whole image)
            assert sum(r is not None and r.found for r in regions) >= len(files) - 1


def test_the_training_localiser_input_is_the_nodes(views: dict[str, list[Path]]) -> None:
    bundle = load_bundle(WEIGHTS / "knee")
    assert bundle.card.roi is not None
    display = DisplayImage()(pydicom.dcmread(views["knee"][0]))
    preprocessing = card_preprocessing(bundle.card, bundle.localiser)
    assert preprocessing.region is not None
    trained = build_preprocessing(
        bundle.card.input_size,
        bundle.card.channels,
        bundle.card.normalisation,
        RoiSettings(bundle.card.roi.input_size),
    )
    whole = trained.localiser_input(display)
    assert whole.shape == (1, 256, 256) and type(whole) is torch.Tensor
    assert torch.equal(whole, preprocessing.localiser_input(display))
    [region] = preprocessing.region.locate(whole[None], [display.shape])
    tensor, located = preprocessing(display)
    assert located == region
    assert torch.equal(tensor, trained(display, region)[0])
