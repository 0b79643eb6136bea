"""Image preprocessing shared by the node and by ``train/``: one MONAI composition per card.

From a DICOM data set to the classifier's input, in four steps (docs/bundles.md):

1. :class:`DisplayImage` — the image as a radiologist sees it: modality LUT, then the VOI LUT or
   the first window (else the 0.5–99.5 percentile range), MONOCHROME1 inverted; float32 in
   [0, 1]. The node keeps this image (Secondary Capture, heatmaps).
2. :class:`LocaliserCrop` (bundles with a region of interest) — the localiser reads the whole
   image standardised at ``roi.input_size`` and the square around the implant is cut from the
   displayed image at the source's resolution (zeros past its edges).
3. :class:`ResizeLongest` + MONAI ``SpatialPad`` — aspect-preserving resize so the longer side
   is ``input_size`` (area-averaged when shrinking, bilinear when enlarging), centre pad.
4. MONAI ``RepeatChannel`` + the normalisation: ``imagenet`` (MONAI ``NormalizeIntensity``
   with ImageNet's channel mean and std), ``unit`` (``NormalizeIntensity``: (x − 0.5) / 0.25)
   or ``standardise`` (:class:`Standardise`, per image).

:class:`Preprocessing` builds the composition from a card's fields (:func:`build_preprocessing`)
and records it (:attr:`Preprocessing.record`, the card's ``preprocessing``); the node
(:func:`classifier_input`) and ``train/`` (``train.data``, ``train.roi``) run the same objects.
Each step is a MONAI array transform with its dictionary (``*d``) wrapper; the composition is a
MONAI ``Compose`` of the wrappers over the keys ``image`` and ``region``. The heatmap goes back
to the source's grid with :func:`heatmap_to_source`.

It is one file of about 600 lines on purpose: every step of the one composition training and
serving share, with its dictionary wrapper and its record, so a change to a step is made next
to the others it must agree with.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    EnsureType,
    EnsureTyped,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RepeatChannel,
    RepeatChanneld,
    Resize,
    SpatialPad,
    SpatialPadd,
    Transform,
)
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from torch import nn

from dicom_node.domain import RegionOfInterest
from dicom_node.models.localiser import locate

if TYPE_CHECKING:
    from dicom_node.models.bundle import Bundle, Card

__all__ = [
    "IMAGE",
    "REGION",
    "DisplayImage",
    "LocaliserCrop",
    "LocaliserCropd",
    "Preprocessing",
    "RegionSettings",
    "ResizeLongest",
    "ResizeLongestd",
    "RoiSettings",
    "Standardise",
    "Standardised",
    "build_preprocessing",
    "card_preprocessing",
    "classifier_input",
    "crop_square",
    "display_image",
    "fitted_shape",
    "heatmap_to_source",
    "preprocessing_record",
    "resize_pad",
    "to_model_input",
]

#: The keys of the composition's data: the image, and the region of interest it shows.
IMAGE, REGION = "image", "region"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY_MEAN, _GREY_STD = 0.449, 0.226  # for channel counts other than 3


# --- 1. display --------------------------------------------------------------------------------


class DisplayImage(Transform):
    """A pydicom data set → the image as displayed: float32 (Rows, Columns) in [0, 1], bright =
    dense, whatever the photometric interpretation.

    Applies the modality LUT (rescale), then the VOI LUT or the first window; falls back to the
    ``percentiles`` range (of every ``subsample``-th pixel of every ``subsample``-th row) when the
    data set carries neither. MONOCHROME1 is inverted. Like MONAI's ``LoadImage`` it returns the
    image without a channel axis; ``EnsureChannelFirst`` adds it.
    """

    backend = [TransformBackends.NUMPY]  # noqa: RUF012 (MONAI: an instance variable)

    def __init__(self, percentiles: Sequence[float] = (0.5, 99.5), subsample: int = 4) -> None:
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.subsample = subsample

    def __call__(self, ds: Dataset, pixels: np.ndarray | None = None) -> np.ndarray:
        array = ds.pixel_array if pixels is None else pixels
        if array.ndim == 3 and array.shape[-1] == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
            # A colour radiograph (scanned film, a secondary capture): its luminance (BT.601).
            array = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            ds = _without_modality_lut(ds)
        elif array.ndim != 2:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            raise ValueError(
                f"multi-frame images ({frames} frames) are not analysed"
                if frames > 1
                else f"expected a single-frame greyscale image, got shape {array.shape}"
            )
        values = _modality_lut(array, ds)
        if not np.isfinite(values).all():
            raise ValueError(
                "the modality LUT (Rescale Slope / Intercept) gives values that are not finite"
            )
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        if has_voi:
            values = _voi_lut(values, ds)
            low, high = float(values.min()), float(values.max())
        else:
            step = self.subsample
            sample = values[::step, ::step]
            low, high = (float(v) for v in np.percentile(sample, self.percentiles))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("the VOI LUT or window gives values that are not finite")
        span = max(high - low, 1e-6)
        image = values  # in place from here: a 100 MP image is 400 MB per float32 copy
        image -= low
        image /= span
        np.clip(image, 0.0, 1.0, out=image)
        if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
            np.subtract(1.0, image, out=image)
        return image


# --- 2. region of interest ---------------------------------------------------------------------


class RegionSettings(Protocol):
    """What the region of interest needs of a card's ``roi``
    (:class:`~dicom_node.models.bundle.RoiSpec`, or :class:`RoiSettings`)."""

    @property
    def input_size(self) -> int: ...
    @property
    def threshold(self) -> float: ...
    @property
    def margin(self) -> float: ...


@dataclass(frozen=True)
class RoiSettings:
    """A card's ``roi`` fields without the localiser's file (``train/``, before it exists);
    the defaults are :class:`~dicom_node.models.bundle.RoiSpec`'s."""

    input_size: int = 256
    threshold: float = 0.5
    margin: float = 0.15


def _paste(source: torch.Tensor, region: RegionOfInterest) -> torch.Tensor:
    """The ``region`` of channel-first ``source`` as (C, side, side); zeros past the edges."""
    rows, cols = int(source.shape[-2]), int(source.shape[-1])
    out = torch.zeros((*source.shape[:-2], region.side, region.side), dtype=source.dtype)
    top, left = max(region.top, 0), max(region.left, 0)
    bottom = min(region.top + region.side, rows)
    right = min(region.left + region.side, cols)
    if bottom > top and right > left:
        out[
            ..., top - region.top : bottom - region.top, left - region.left : right - region.left
        ] = source[..., top:bottom, left:right]
    return out


_NO_LOCALISER = "the region of interest needs a localiser network, or the region"


class LocaliserCrop(Transform):
    """The region of interest: where the localiser finds the implant, the square cut from the
    channel-first image at its resolution (zeros past the image's edges).

    ``localiser_input`` makes the localiser's (1, S, S) input from the image (the composition
    :class:`Preprocessing` builds: resize and pad to ``roi.input_size``, standardise); cells of
    the localiser's map at or above ``threshold`` give the box, which grows by ``margin`` of its
    side (:func:`~dicom_node.models.localiser.locate`). Called with a ``region`` (``train/``
    locates a whole set in batches), the crop uses it. Returns the crop and its region, as
    MONAI's ``CropForeground(return_coords=True)`` returns its box.
    """

    backend = [TransformBackends.TORCH]  # noqa: RUF012 (MONAI: an instance variable)

    def __init__(
        self,
        localiser_input: Compose,
        threshold: float,
        margin: float,
        localiser: nn.Module | None = None,
    ) -> None:
        self.localiser_input = localiser_input
        self.threshold = threshold
        self.margin = margin
        self.localiser = localiser

    def locate(
        self,
        inputs: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        localiser: nn.Module | None = None,
    ) -> list[RegionOfInterest]:
        """Regions for a batch of (N, 1, S, S) localiser inputs of images of ``shapes``."""
        network = localiser if localiser is not None else self.localiser
        if network is None:
            raise ValueError(_NO_LOCALISER)
        return locate(network, inputs, shapes, self.threshold, self.margin)

    def __call__(
        self, img: torch.Tensor, region: RegionOfInterest | None = None
    ) -> tuple[torch.Tensor, RegionOfInterest]:
        image = convert_to_tensor(img, track_meta=False)
        if region is None:
            if self.localiser is None:
                raise ValueError(_NO_LOCALISER)
            whole = self.localiser_input(img)
            [region] = self.locate(whole[None], [(int(image.shape[-2]), int(image.shape[-1]))])
        return _paste(image, region), region


class LocaliserCropd(MapTransform):
    """Dictionary wrapper of :class:`LocaliserCrop`: crops ``keys``, writes ``region_key`` (and
    uses the region already there, when there is one)."""

    backend = LocaliserCrop.backend

    def __init__(
        self,
        keys: str | Sequence[Hashable],
        localiser_input: Compose,
        threshold: float,
        margin: float,
        localiser: nn.Module | None = None,
        region_key: str = REGION,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = LocaliserCrop(localiser_input, threshold, margin, localiser)
        self.region_key = region_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.region_key] = self.cropper(d[key], d.get(self.region_key))
        return d


# --- 3. resize and pad -------------------------------------------------------------------------


def fitted_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """(rows, cols) of an image resized so its longer side is ``size``, aspect kept."""
    scale = size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


class ResizeLongest(Transform):
    """Resize a channel-first image so its longer side is ``size``, keeping the aspect ratio:
    MONAI's ``Resize`` in ``area`` mode when shrinking (each output pixel the mean of the source
    pixels it covers), ``bilinear`` (``align_corners=False``) when enlarging.

    MONAI's ``Resize(size_mode="longest")`` has one mode for every image; this picks it per image
    and never rounds a side to zero pixels.
    """

    backend = Resize.backend

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        rows, cols = int(img.shape[-2]), int(img.shape[-1])
        shape = fitted_shape(rows, cols, self.size)
        if self.size < max(rows, cols):
            return Resize(shape, mode="area")(img)
        return Resize(shape, mode="bilinear", align_corners=False)(img)


class _Applied(MapTransform):
    """Dictionary wrapper that applies one array transform (``self.transform``) to ``keys``."""

    transform: Callable[[Any], Any]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class ResizeLongestd(_Applied):
    """Dictionary wrapper of :class:`ResizeLongest`."""

    backend = ResizeLongest.backend

    def __init__(
        self, keys: str | Sequence[Hashable], size: int, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ResizeLongest(size)


# --- 4. normalisation --------------------------------------------------------------------------


class Standardise(Transform):
    """Zero mean, unit variance over the whole image (all channels): (x − mean) / max(s,
    ``min_std``), s the sample standard deviation.

    MONAI's ``NormalizeIntensity`` divides by the population standard deviation and by 1 where
    it is zero; the shipped bundles were trained with this one.
    """

    backend = [TransformBackends.TORCH]  # noqa: RUF012 (MONAI: an instance variable)

    def __init__(self, min_std: float = 1e-3) -> None:
        self.min_std = min_std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        tracked = convert_to_tensor(img, dtype=torch.float32, track_meta=get_track_meta())
        x = tracked.as_tensor() if isinstance(tracked, MetaTensor) else tracked
        out = (x - x.mean()) / x.std().clamp_min(self.min_std)
        return convert_to_dst_type(out, tracked)[0]


class Standardised(_Applied):
    """Dictionary wrapper of :class:`Standardise`."""

    backend = Standardise.backend

    def __init__(
        self,
        keys: str | Sequence[Hashable],
        min_std: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Standardise(min_std)


# --- the composition ---------------------------------------------------------------------------

_Step = tuple[type, dict[str, Any]]

#: Each array transform's dictionary wrapper: the composition runs these on ``image``.
_WRAPPER: dict[type, type] = {
    EnsureChannelFirst: EnsureChannelFirstd,
    LocaliserCrop: LocaliserCropd,
    ResizeLongest: ResizeLongestd,
    SpatialPad: SpatialPadd,
    RepeatChannel: RepeatChanneld,
    NormalizeIntensity: NormalizeIntensityd,
    Standardise: Standardised,
    EnsureType: EnsureTyped,
}


def _square_steps(size: int) -> list[_Step]:
    return [
        (ResizeLongest, {"size": size}),
        (SpatialPad, {"spatial_size": [size, size], "method": "symmetric", "mode": "constant"}),
    ]


def _normalise_steps(normalisation: str, channels: int) -> list[_Step]:
    if normalisation == "imagenet":
        mean = list(_IMAGENET_MEAN) if channels == 3 else [_GREY_MEAN] * channels
        std = list(_IMAGENET_STD) if channels == 3 else [_GREY_STD] * channels
        return [(NormalizeIntensity, {"subtrahend": mean, "divisor": std, "channel_wise": True})]
    if normalisation == "unit":  # (x - 0.5) * 4: the [0, 1] image centred at 0, scaled by 4
        return [(NormalizeIntensity, {"subtrahend": 0.5, "divisor": 0.25})]
    if normalisation == "standardise":
        return [(Standardise, {"min_std": 1e-3})]
    raise ValueError(f"unknown normalisation {normalisation!r}: use imagenet, unit or standardise")


_TO_TENSOR: _Step = (EnsureType, {"data_type": "tensor", "track_meta": False})


def _record(steps: Sequence[_Step]) -> list[dict[str, Any]]:
    """The steps as the card records them: each transform's name and arguments (the
    region-of-interest step's ``localiser_input``, itself steps, recorded the same way)."""
    return [
        {
            "transform": cls.__name__,
            "args": {
                key: _record(value) if key == "localiser_input" else copy.deepcopy(value)
                for key, value in args.items()
            },
        }
        for cls, args in steps
    ]


_TRACKING = threading.Lock()
_untracked_depth = 0
_tracked_before = True


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """MONAI's metadata tracking (``MetaTensor``: affine, applied operations) off while a
    composition runs: nothing here reads it, and it costs some 3 ms a view. The switch is the
    process's (``monai.data.set_track_meta``), so it is restored when the last caller leaves."""
    global _untracked_depth, _tracked_before
    with _TRACKING:
        if _untracked_depth == 0:
            _tracked_before = get_track_meta()
            set_track_meta(False)
        _untracked_depth += 1
    try:
        yield
    finally:
        with _TRACKING:
            _untracked_depth -= 1
            if _untracked_depth == 0:
                set_track_meta(_tracked_before)


class Preprocessing:
    """The preprocessing of one model: built from its card's fields, recorded on the card.

    ``display`` (:class:`DisplayImage`) turns a data set into the displayed image; ``compose``
    (a MONAI ``Compose`` of dictionary transforms) turns ``{"image": displayed image}`` into
    ``{"image": (channels, input_size, input_size) tensor, "region": RegionOfInterest}``
    (``region`` only with a region of interest). ``record`` lists every step's array transform
    with its arguments, as the card's ``preprocessing`` holds it. ``region`` is the
    region-of-interest step (``train/`` locates a whole set in batches with its ``locate``).
    """

    def __init__(
        self,
        input_size: int,
        channels: int = 3,
        normalisation: str = "imagenet",
        roi: RegionSettings | None = None,
        localiser: nn.Module | None = None,
    ) -> None:
        display: _Step = (DisplayImage, {"percentiles": [0.5, 99.5], "subsample": 4})
        channel_first: _Step = (EnsureChannelFirst, {"channel_dim": "no_channel"})
        self.display = DisplayImage(**display[1])
        self.channel_first = EnsureChannelFirst(**channel_first[1])
        steps: list[_Step] = [channel_first]
        self.region: LocaliserCrop | None = None
        if roi is not None:
            whole = [*_square_steps(roi.input_size), *_normalise_steps("standardise", 1)]
            whole.append(_TO_TENSOR)
            crop_args = {"localiser_input": whole, "threshold": roi.threshold, "margin": roi.margin}
            steps.append((LocaliserCrop, crop_args))
        steps += [
            *_square_steps(input_size),
            (RepeatChannel, {"repeats": channels}),
            *_normalise_steps(normalisation, channels),
            _TO_TENSOR,
        ]
        transforms = []
        for cls, args in steps:
            if cls is LocaliserCrop:
                localiser_input = Compose([c(**a) for c, a in args["localiser_input"]])
                crop = LocaliserCropd(
                    IMAGE, localiser_input, args["threshold"], args["margin"], localiser
                )
                self.region = crop.cropper
                transforms.append(crop)
            else:
                transforms.append(_WRAPPER[cls](IMAGE, **args))
        self.compose = Compose(transforms)
        self.record = _record([display, *steps])

    def __call__(
        self, display: np.ndarray, region: RegionOfInterest | None = None
    ) -> tuple[torch.Tensor, RegionOfInterest | None]:
        """The model's input for a displayed image, and the region it shows (None: whole).
        With a region of interest, ``region`` (when given) is used instead of locating."""
        data: dict[Hashable, Any] = {IMAGE: display}
        if region is not None:
            if self.region is None:
                raise ValueError("this preprocessing has no region of interest to crop")
            data[REGION] = region
        with _untracked():
            out = self.compose(data)
        return out[IMAGE], out.get(REGION)

    def localiser_input(self, display: np.ndarray) -> torch.Tensor:
        """The localiser's (1, S, S) input for a displayed image (region of interest only)."""
        if self.region is None:
            raise ValueError("this preprocessing has no region of interest")
        with _untracked():
            channel_first = self.channel_first(display)  # type: ignore[arg-type]
            return self.region.localiser_input(channel_first)


@functools.lru_cache(maxsize=32)
def _cached(
    input_size: int,
    channels: int,
    normalisation: str,
    roi: RoiSettings | None,
    localiser: nn.Module | None,
) -> Preprocessing:
    return Preprocessing(input_size, channels, normalisation, roi, localiser)


def build_preprocessing(
    input_size: int,
    channels: int = 3,
    normalisation: str = "imagenet",
    roi: RegionSettings | None = None,
    localiser: nn.Module | None = None,
) -> Preprocessing:
    """The :class:`Preprocessing` of these card fields (``input_size``, ``channels``,
    ``normalisation``, ``roi``), built once and shared (it keeps no state between calls).

    The region of interest locates with ``localiser``; without one (``train/``, before the
    localiser is trained) the crop needs the region given.
    """
    key = None if roi is None else RoiSettings(roi.input_size, roi.threshold, roi.margin)
    return _cached(input_size, channels, normalisation, key, localiser)


def card_preprocessing(card: Card, localiser: nn.Module | None = None) -> Preprocessing:
    """The :class:`Preprocessing` a card describes (see :func:`build_preprocessing`)."""
    return build_preprocessing(
        card.input_size, card.channels, card.normalisation, card.roi, localiser
    )


def preprocessing_record(
    input_size: int, channels: int, normalisation: str, roi: RegionSettings | None = None
) -> list[dict[str, Any]]:
    """The card's ``preprocessing``: every transform :class:`Preprocessing` builds from these
    fields, with its arguments."""
    return copy.deepcopy(build_preprocessing(input_size, channels, normalisation, roi).record)


# --- the node's calls, and the steps as functions ----------------------------------------------

_DISPLAY = DisplayImage()


def _first(value: Any) -> float:
    """The first of a multi-valued DS (several windows), as a float."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _modality_lut(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """The modality LUT in float32 (a new array). pydicom's works in float64: twice the memory
    of a 100 MP image for nothing the display needs."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(array, ds), dtype=np.float32)
    values = array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first window (PS3.3 C.11.2.1.2.1, LINEAR), in float32 and in place, onto [0, 1];
    a VOI LUT sequence or another VOI LUT Function goes through pydicom."""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if "VOILUTSequence" in ds or function != "LINEAR":
        return np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float32)
    centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if not (np.isfinite(centre) and np.isfinite(width)):
        raise ValueError("the window (Window Center / Width) is not finite")
    if width <= 1.0:  # a threshold at the centre
        return (values > centre - 0.5).astype(np.float32)
    values -= np.float32(centre - 0.5)
    values /= np.float32(width - 1.0)
    values += np.float32(0.5)
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _without_modality_lut(ds: Dataset) -> Dataset:
    """A shallow copy without Rescale / Modality LUT (they do not apply to colour)."""
    plain = Dataset(ds)
    for keyword in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"):
        if keyword in plain:
            delattr(plain, keyword)
    plain.PhotometricInterpretation = "MONOCHROME2"
    return plain


def display_image(ds: Dataset, pixels: np.ndarray | None = None) -> np.ndarray:
    """The image as displayed (:class:`DisplayImage`): float32 in [0, 1], bright = dense."""
    return _DISPLAY(ds, pixels)


def classifier_input(
    bundle: Bundle, display: np.ndarray
) -> tuple[torch.Tensor, RegionOfInterest | None]:
    """The classifier's input for a displayed image, and the region it shows (None: whole).

    The bundle's :class:`Preprocessing` (:func:`card_preprocessing`); ``train/`` runs the
    same composition, locating its images in batches. A bundle without a localiser network
    reads the whole image.
    """
    card = bundle.card
    if bundle.localiser is None or card.roi is None:
        preprocessing = build_preprocessing(card.input_size, card.channels, card.normalisation)
    else:
        preprocessing = card_preprocessing(card, bundle.localiser)
    return preprocessing(display)


def to_model_input(
    display: np.ndarray, size: int, channels: int = 3, normalisation: str = "imagenet"
) -> torch.Tensor:
    """A (channels, size, size) float tensor for the network, from a displayed image (steps
    3 and 4 of :class:`Preprocessing`). ``normalisation``: imagenet, unit or standardise."""
    tensor, _ = build_preprocessing(size, channels, normalisation)(display)
    return tensor


@functools.lru_cache(maxsize=16)
def _square(size: int) -> Compose:
    return Compose([cls(**args) for cls, args in _square_steps(size)])


def resize_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (area-averaged when shrinking); centre-pad square
    (step 3 of :class:`Preprocessing`, for masks and figures)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    with _untracked():
        out = convert_to_tensor(_square(size)(tensor), track_meta=False)
    return out[0].numpy()


def crop_square(display: np.ndarray, region: RegionOfInterest) -> np.ndarray:
    """The ``region`` of a displayed image as a (side, side) array; zeros past the image's edges
    (the crop of :class:`LocaliserCrop`)."""
    source = torch.from_numpy(np.ascontiguousarray(display, dtype=np.float32))
    return _paste(source, region).numpy()


def heatmap_to_source(
    heatmap: np.ndarray, rows: int, cols: int, region: RegionOfInterest | None = None
) -> np.ndarray:
    """Undo :func:`resize_pad` (and :func:`crop_square`): a (size, size) map on the source grid.

    Without a region, the padding is cropped and the map resized to Rows × Columns. With one,
    the map is resized to the region's side and pasted at its place; outside it the map is 0.
    """
    size = heatmap.shape[0]
    if region is None:
        inner_rows, inner_cols = fitted_shape(rows, cols, size)
        top, left = (size - inner_rows) // 2, (size - inner_cols) // 2
        cropped = np.ascontiguousarray(heatmap[top : top + inner_rows, left : left + inner_cols])
        return _resize(cropped, rows, cols)
    square = _resize(heatmap, region.side, region.side)
    out = np.zeros((rows, cols), dtype=np.float32)
    top, left = max(region.top, 0), max(region.left, 0)
    bottom = min(region.top + region.side, rows)
    right = min(region.left + region.side, cols)
    if bottom > top and right > left:
        out[top:bottom, left:right] = square[
            top - region.top : bottom - region.top, left - region.left : right - region.left
        ]
    return out


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
