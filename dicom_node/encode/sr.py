"""Structured Report: the AI result as a TID 1500 Imaging Measurement Report (Comprehensive 3D SR).

The SR is the machine-readable record of the result (what IHE AI Results asks for). Built with
highdicom; pydicom adds only what highdicom cannot express (the Device UID of the algorithm in
the Contributing Equipment Sequence, and the root-level Qualitative Evaluations container that
highdicom 0.28 does not offer).

Content: a device observer (the model, with a Device UID stable for one model version), the
procedure reported (an imaging procedure, never the algorithm), an Image Library of the analysed
(and excluded) images, and one measurement group (TID 1501) per analysed image plus a
study-level group for the fused result, whose source images are the images it combines
(``prediction.fused_views``: the latest image of each view; all images when empty). A study
may carry two images of one view (a view sent twice): each has its own group, named "image N"
by its place in the study. Each group carries a tracking identifier and UID, the finding, its
site with laterality, the algorithm (TID 4019), the predicted class as a coded qualitative
evaluation, Certainty of Finding in percent and each class's probability in percent (concept
name: the class's own code). The finding, the site and the evaluation's concept name come from
the task's spec (:class:`dicom_node.tasks.TaskSpec`); every private ("99...") coding scheme the
content uses is declared in the Coding Scheme Identification Sequence.

A group's evaluation is "undetermined" (373068000, SCT) when the study-level prediction
abstains, or when that group's own top probability is below the bundle's threshold. Its
certainty is still reported, so a reader sees how unsure the model was.

A result made again for the same study and task (version 2, 3...: images arrived after the
earlier one was made) says that it supersedes the earlier results, as a TEXT Comment (121106,
DCM) in the root's Qualitative Evaluations container (C0034375, UMLS; the TID 1500 row of that
name, row 12 in the edition pixelmed's validator checks). The earlier SR and SCs stay where
they were sent; this one has new UIDs.

Images the applicability stage excluded (``prediction.not_applicable``: no implant, another
anatomy or view, outside the training distribution) are listed in the Image Library and the
evidence like the analysed ones, and said so in the same Qualitative Evaluations container:

- When no image was analysed, the SR carries no class, probability, certainty or loosening
  call, and no Imaging Measurements container: TID 1500 needs only one of Imaging
  Measurements, Derived Imaging Measurements and Qualitative Evaluations, and an Imaging
  Measurements container is there to hold measurement groups (highdicom 0.28 refuses one
  without). The Qualitative Evaluations container holds the task's evaluation
  with the value Not applicable (385432009, SCT), one coded reason (concept NA-REASON,
  99ORTHONODE; values :data:`~dicom_node.encode.common.NOT_APPLICABLE_REASON_CODES`) per
  distinct reason, and one TEXT Comment per image with what was measured. The Series
  Description says NOT APPLICABLE.
- When some images were analysed, their groups are as usual, and the container holds a coded
  reason and a TEXT Comment per excluded image.

Excluded images are numbered after the analysed ones, and each Comment names its image, with
the score that decided and its threshold when the applicability stage gives them ("LAT image 3
not applicable: no implant detected (...); implant probability 2%, threshold 31%"). The
numbers are in the Comment only: TID 1500's Qualitative Evaluations container holds CODE and
TEXT items, no NUM (pixelmed's validator: "Content Item not in template").

Tracking UIDs are derived from the SR's SOP Instance UID, so an SR rebuilt with the same UIDs
and time is the same object.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from dicom_node.domain import (
    NOT_APPLICABLE_REASONS,
    ClassInfo,
    Explanation,
    NotApplicable,
    Prediction,
    RegionOfInterest,
    decide,
)
from dicom_node.encode.common import (
    LATERALITY,
    NOT_APPLICABLE,
    NOT_APPLICABLE_REASON,
    NOT_APPLICABLE_REASON_CODES,
    algorithm_equipment,
    check_task,
    check_version,
    fused_indices,
    fused_view_names,
    laterality_of,
    not_applicable_score,
    not_applicable_text,
    patient_study_header,
    pin_contribution_time,
    result_phrase,
    saliency_method,
    saliency_peak,
    series_description,
    supersede_statement,
)
from dicom_node.errors import EncodeError
from dicom_node.models.codes import PRIVATE_SCHEME, UNDETERMINED
from dicom_node.tasks import Code, TaskSpec
from dicom_node.wording import percent_value

__all__ = ["build_structured_report"]

log = logging.getLogger(__name__)

_CODE_VALUE_MAX = 16  # longer values become LongCodeValue, which viewers ignore
_CODE_MEANING_MAX = 64

# Modalities for which highdicom adds the projection radiography descriptors (TID 1603).
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
_UNDETERMINED = hd.sr.CodedConcept(*UNDETERMINED)
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
_CERTAINTY = hd.sr.CodedConcept.from_code(codes.DCM.CertaintyOfFinding)
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_OPERATING_POINT_CODE = "OP-POINT"
_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
_MEASUREMENT_METHOD = "370129005"


def build_structured_report(
    prediction: Prediction,
    sources: Sequence[Dataset],
    secondary_captures: Sequence[Dataset],
    *,
    spec: TaskSpec,
    version: int = 1,
    excluded_sources: Sequence[Dataset] = (),
    explanations: Sequence[Explanation] = (),
    series_number: int = 9001,
    instance_uid: str | None = None,
    series_uid: str | None = None,
    now: dt.datetime | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR of one study's prediction for one task.

    Parameters
    ----------
    prediction : Prediction
        Per-view probabilities, the fused result (if any) and the views it combines, the
        classes and the model.
    sources : Sequence[pydicom.Dataset]
        The analysed source images, in the order of ``prediction.views``. The first one gives
        the patient and study attributes (copied; missing Type 2 attributes become empty).
        Empty when no image was analysed (``not prediction.applicable``).
    secondary_captures : Sequence[pydicom.Dataset]
        The Secondary Captures made for this prediction; listed as evidence with the sources.
    spec : TaskSpec
        The spec of the prediction's task: the finding, finding site and evaluation codes.
    version : int
        The result's version for this study and task (1, 2, ...); from 2 on, the SR says that
        it supersedes the earlier results.
    excluded_sources : Sequence[pydicom.Dataset]
        The source images of ``prediction.not_applicable``, in that order: listed in the Image
        Library and the evidence. The first one gives the patient and study attributes when
        ``sources`` is empty.
    explanations : Sequence[Explanation]
        The saliency of each analysed source, in the order of ``sources`` (or none): each
        adds a group whose image region is the saliency peak (a POINT). Without them, the
        per-image groups still carry the region the classifier read.
    series_number : int
        Series Number of the SR (high, so it sorts after the radiographs).
    instance_uid, series_uid : str, optional
        SOP Instance UID and Series Instance UID; new UIDs when not given.
    now : datetime.datetime, optional
        Content, series and instance creation time; ``datetime.now()`` when not given.

    Returns
    -------
    pydicom.Dataset
        A highdicom ``Comprehensive3DSR`` with file meta information (Explicit VR Little
        Endian), ready to ``save_as(..., enforce_file_format=True)``.

    Raises
    ------
    EncodeError
        When the spec is of another task, the version is below 1, the sources do not match
        the prediction's views (or the excluded sources its not-applicable images), the fused
        views are not indices into them, a reason is unknown, a code is too long, or
        highdicom rejects a value.
    """
    check_task(prediction, spec)
    check_version(version)
    _check(prediction, sources, excluded_sources)
    now = now or dt.datetime.now()
    instance_uid = instance_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    model = prediction.model
    images = [*sources, *excluded_sources]
    headers = [patient_study_header(source) for source in images]
    sides = [
        laterality_of(source) or view.view.laterality
        for view, source in zip(prediction.views, sources, strict=True)
    ]
    if explanations and len(explanations) != len(sources):
        raise EncodeError(f"{len(explanations)} explanation(s) for {len(sources)} source(s)")
    for given, source in zip(explanations, sources, strict=False):
        if given.view.instance.sop_instance_uid != source.SOPInstanceUID:
            raise EncodeError(
                f"the explanation is of {given.view.instance.sop_instance_uid}, "
                f"the source is {source.SOPInstanceUID}"
            )
    try:
        groups: list[_Group] = []
        for index, (view, source) in enumerate(zip(prediction.views, sources, strict=True)):
            name = f"{prediction.task} {view.view.view} image {index + 1}"
            explanation = explanations[index] if explanations else None
            region = view.region
            if explanation is not None and explanation.region is not None:
                region = explanation.region
            groups.append(
                _image_group(
                    prediction,
                    spec,
                    probabilities=view.probabilities,
                    identifier=name,
                    tracking_uid=_tracking_uid(instance_uid, index),
                    laterality=sides[index],
                    region=_box(source, region),
                )
            )
            if explanation is None:
                continue
            groups.append(
                _image_group(
                    prediction,
                    spec,
                    probabilities=view.probabilities,
                    identifier=f"{name} saliency peak",
                    tracking_uid=_tracking_uid(instance_uid, f"peak {index}"),
                    laterality=sides[index],
                    region=_peak(source, explanation),
                    method=saliency_method(explanation.method),
                    evaluation=False,
                )
            )
        if prediction.fused_probabilities is not None:
            fused = fused_indices(prediction)
            names = fused_view_names(prediction)
            groups.append(
                _group(
                    prediction,
                    spec,
                    probabilities=prediction.fused_probabilities,
                    identifier=f"{prediction.task} study-level {names} fused",
                    tracking_uid=_tracking_uid(instance_uid, len(prediction.views)),
                    lateralities=[sides[i] for i in fused],
                    images=[sources[i] for i in fused],
                )
            )
        observer = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=model.device_uid,
                name=model.name,
                manufacturer_name=model.manufacturer,
                model_name=model.name,
            ),
        )
        # highdicom 0.28 wants at least one group: without any, the report is built with a
        # placeholder whose Imaging Measurements container is then removed.
        content = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=_IMAGING_PROCEDURE,
            imaging_measurements=groups or [_placeholder_group(instance_uid)],
            referenced_images=[_library_entry(header) for header in headers],
        )
        if not groups:
            _remove_imaging_measurements(content[0])
        evaluations = _not_applicable_items(prediction, spec)
        if prediction.applicable:
            evaluations.insert(0, _comment(_result_statement(prediction, spec)))
        evaluations.insert(1, _comment(_warning_statement(model.demo)))
        statement = supersede_statement(version)
        if statement is not None:
            evaluations.append(_comment(statement))
        if evaluations:
            content[0].ContentSequence.append(_qualitative_evaluations(evaluations))
        # highdicom logs a patient name it finds suspicious: it never sees the name; the
        # name is copied onto the finished SR below.
        first = patient_study_header(headers[0])
        first.PatientName = ""
        # highdicom deep-copies the content tree and parses the copy back into its classes
        # (~0.16 s of a knee SR's ~0.21 s on main): it is given an empty root instead, and the
        # tree built above becomes the document's content as it is.
        root = content[0]
        report = hd.sr.Comprehensive3DSR(
            evidence=[first, *images[1:], *secondary_captures],
            content=_empty_root(root),
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            manufacturer=model.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[algorithm_equipment(model, now)],
            series_description=series_description(
                prediction.task, "SR", model.demo, not_applicable=not prediction.applicable
            ),
            manufacturer_model_name=model.name,
            software_versions=model.version,
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
            coding_schemes=_coding_schemes(_private_schemes(content)),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise EncodeError(f"cannot build the structured report: {error}") from error
    report.ContentSequence = root.ContentSequence
    # The wording uses "—" and "≥", and a source's names may be in any repertoire: UTF-8.
    report.SpecificCharacterSet = "ISO_IR 192"
    report.PatientName = headers[0].PatientName
    pin_contribution_time(report, now)
    report.InstanceCreationDate = DA(now.date())
    report.InstanceCreationTime = TM(now.time())
    log.info(
        "structured report built",
        extra={
            "sop_instance_uid": instance_uid,
            "study_instance_uid": prediction.study_instance_uid,
            "groups": len(groups),
            "not_applicable": len(prediction.not_applicable),
            "version": version,
        },
    )
    return report


def _check(
    prediction: Prediction, sources: Sequence[Dataset], excluded_sources: Sequence[Dataset]
) -> None:
    if not sources and not excluded_sources:
        raise EncodeError("no source image: an SR needs at least one analysed or excluded image")
    if len(sources) != len(prediction.views):
        raise EncodeError(f"{len(sources)} source(s) for {len(prediction.views)} predicted view(s)")
    for index, (view, source) in enumerate(zip(prediction.views, sources, strict=True)):
        if view.view.instance.sop_instance_uid != source.SOPInstanceUID:
            raise EncodeError(
                f"source {index} is {source.SOPInstanceUID}, "
                f"view {index} predicts {view.view.instance.sop_instance_uid}"
            )
    excluded = prediction.not_applicable
    if len(excluded_sources) != len(excluded):
        raise EncodeError(
            f"{len(excluded_sources)} excluded source(s) for {len(excluded)} image(s) "
            "not applicable"
        )
    for index, (item, source) in enumerate(zip(excluded, excluded_sources, strict=True)):
        if item.view.instance.sop_instance_uid != source.SOPInstanceUID:
            raise EncodeError(
                f"excluded source {index} is {source.SOPInstanceUID}, "
                f"not-applicable image {index} is {item.view.instance.sop_instance_uid}"
            )
        if item.reason not in NOT_APPLICABLE_REASON_CODES:
            raise EncodeError(
                f"not-applicable image {index}: reason {item.reason!r} is not one of "
                f"{list(NOT_APPLICABLE_REASONS)}"
            )
    both = {str(ds.SOPInstanceUID) for ds in sources} & {
        str(ds.SOPInstanceUID) for ds in excluded_sources
    }
    if both:
        raise EncodeError(f"images both analysed and excluded: {sorted(both)}")
    if not prediction.applicable:
        if prediction.fused_probabilities is not None:
            raise EncodeError("no image was analysed, yet the prediction has a fused result")
        return  # no class, no probability is written: nothing more to check
    if prediction.fused_probabilities is not None:
        fused_indices(prediction)  # EncodeError when they are not indices into the views
    counts = {len(view.probabilities) for view in prediction.views}
    if prediction.fused_probabilities is not None:
        counts.add(len(prediction.fused_probabilities))
    if counts != {len(prediction.classes)}:
        raise EncodeError(
            f"{len(prediction.classes)} classes but probability vectors of lengths {counts}"
        )
    for info in prediction.classes:
        if len(info.code_value) > _CODE_VALUE_MAX:
            raise EncodeError(
                f"class {info.name!r}: CodeValue {info.code_value!r} is longer than "
                f"{_CODE_VALUE_MAX} characters (it would become LongCodeValue)"
            )
        if not 0 < len(info.code_meaning) <= _CODE_MEANING_MAX:
            raise EncodeError(
                f"class {info.name!r}: CodeMeaning must have 1 to {_CODE_MEANING_MAX} characters"
            )


def _group(
    prediction: Prediction,
    spec: TaskSpec,
    *,
    probabilities: Sequence[float],
    identifier: str,
    tracking_uid: str,
    lateralities: Sequence[str | None],
    images: Sequence[Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study-level TID 1501 group: the fused result of the images it combines.

    Its first NUM (the result) is INFERRED FROM the whole of the first image it combines (a
    closed POLYLINE on the image's edges): OHIF 3.13.2 stops loading an SR at the first
    measurement group it cannot place on an image (TypeError in
    _checkIfCanAddMeasurementsToDisplaySet, a black viewport), and places a group without an
    Image Region by its NUMs' coordinates. Drawn on the frame of the image, the study-level
    label stands apart from the image's own box (the localiser's square).
    """
    # The study-level group has a side only when every image it combines shows the same one.
    sides = set(lateralities)
    side = LATERALITY.get(sides.pop() or "") if len(sides) == 1 else None
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        finding_type=_concept(spec.finding),
        finding_sites=[hd.sr.FindingSite(anatomic_location=_concept(spec.site), laterality=side)],
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=prediction.model.name, version=prediction.model.version
        ),
        measurements=_measurements(prediction, probabilities, frame=images[0]),
        qualitative_evaluations=[_evaluation(prediction, spec, probabilities)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in images
        ],
    )
    _method_is_a_modifier(group[0])
    return group


def _image_group(
    prediction: Prediction,
    spec: TaskSpec,
    *,
    probabilities: Sequence[float],
    identifier: str,
    tracking_uid: str,
    laterality: str | None,
    region: hd.sr.ImageRegion,
    method: hd.sr.CodedConcept | None = None,
    evaluation: bool = True,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group on one image: its region (what the classifier read, or the saliency
    peak), the finding, site, algorithm, the result and the probabilities.

    The region is what OHIF's SR display and the cornerstone SR adapters draw on the
    radiograph; they label it with the group's NUM items, at most five lines of "concept:
    value unit" (OHIF 3.13.2 writes the value with two decimals, "Zimmer LPS: 97.12 %"), so
    the first NUM is the result: the called class's probability (and, at an operating point,
    that point). The saliency-peak group (``evaluation`` False) repeats that first NUM as its
    label and makes no call of its own; it has no finding site (see below).
    """
    side = LATERALITY.get(laterality or "")
    measurements = _measurements(prediction, probabilities)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        referenced_region=region,
        finding_type=_concept(spec.finding),
        method=method,
        # OHIF adds the site to the drawn label as "363698007: Knee joint"; on the peak it
        # would be the second of two lines, so the peak leaves it to its image's group.
        finding_sites=[hd.sr.FindingSite(anatomic_location=_concept(spec.site), laterality=side)]
        if evaluation
        else None,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=prediction.model.name, version=prediction.model.version
        ),
        measurements=measurements if evaluation else measurements[: _label_lines(prediction)],
        qualitative_evaluations=[_evaluation(prediction, spec, probabilities)]
        if evaluation
        else None,
    )
    _method_is_a_modifier(group[0])
    return group


def _evaluation(
    prediction: Prediction, spec: TaskSpec, probabilities: Sequence[float]
) -> hd.sr.QualitativeEvaluation:
    """The called class, or "undetermined" when the study abstains or this group's top
    probability is below the bundle's threshold."""
    best = decide(tuple(probabilities), prediction.decision_threshold)
    unsure = prediction.decision_threshold is None and probabilities[best] < prediction.threshold
    value = _UNDETERMINED if prediction.abstained or unsure else _coded(prediction.classes[best])
    return hd.sr.QualitativeEvaluation(name=_concept(spec.evaluation), value=value)


def _label_lines(prediction: Prediction) -> int:
    """How many of :func:`_measurements`' first items name the result: the called class's
    probability, and the operating point where there is one."""
    return 2 if prediction.decision_threshold is not None else 1


def _measurements(
    prediction: Prediction, probabilities: Sequence[float], *, frame: Dataset | None = None
) -> list[hd.sr.Measurement]:
    """The group's NUM items, the result first: at an operating point the positive class's
    probability and the point; otherwise the called class's probability. Then the other
    classes, most probable first, then Certainty of Finding (the called class's probability).
    With ``frame``, the first is INFERRED FROM that image's whole extent (see :func:`_group`)."""
    probabilities = tuple(float(p) for p in probabilities)
    best = decide(probabilities, prediction.decision_threshold)
    items: list[hd.sr.Measurement] = []
    order = sorted(range(len(probabilities)), key=lambda i: (-probabilities[i], i))
    if prediction.decision_threshold is not None and len(probabilities) == 2:
        items.append(_percent(_coded(prediction.classes[1]), probabilities[1], frame))
        items.append(_percent(_operating_point(prediction), prediction.decision_threshold))
        order = [0]
    else:
        order.remove(best)
        items.append(_percent(_coded(prediction.classes[best]), probabilities[best], frame))
    items += [_percent(_coded(prediction.classes[i]), probabilities[i]) for i in order]
    items.append(_percent(_CERTAINTY, probabilities[best]))
    return items


def _operating_point(prediction: Prediction) -> hd.sr.CodedConcept:
    """Concept of the operating point NUM: the probability of the positive class from which
    it is called (private code; no standard concept says this)."""
    positive = prediction.classes[1].code_meaning
    return hd.sr.CodedConcept(
        _OPERATING_POINT_CODE, PRIVATE_SCHEME, f"Called {positive.lower()} at or above"[:64]
    )


def _method_is_a_modifier(container: Dataset) -> None:
    """Measurement Method is HAS CONCEPT MOD in TID 1410/1501 (row 5); highdicom 0.28 writes
    CONTAINS, which pixelmed's validator reports as an error."""
    for item in container.ContentSequence:
        if _code_value(item) == _MEASUREMENT_METHOD:
            item.RelationshipType = "HAS CONCEPT MOD"


def _code_value(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _box(source: Dataset, region: RegionOfInterest | None) -> hd.sr.ImageRegion:
    """The region the classifier read, on the source image, as a closed POLYLINE (the whole
    image when the bundle does not crop); clipped to the image."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_corners(source, region),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _corners(source: Dataset, region: RegionOfInterest | None) -> np.ndarray:
    """(column, row) corners of ``region`` clipped to the image, closed (the first repeated);
    the image's own corners for no region, or for a region entirely outside it."""
    rows, columns = float(source.Rows), float(source.Columns)
    if region is None:
        top, left, bottom, right = 0.0, 0.0, rows, columns
    else:
        top, left = max(0.0, float(region.top)), max(0.0, float(region.left))
        bottom = min(rows, float(region.top + region.side))
        right = min(columns, float(region.left + region.side))
        if bottom <= top or right <= left:  # entirely outside: say the whole image
            top, left, bottom, right = 0.0, 0.0, rows, columns
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    return np.array(corners, dtype=np.float64)


def _peak(source: Dataset, explanation: Explanation) -> hd.sr.ImageRegion:
    """The saliency peak as a POINT at the centre of the hottest pixel (column, row)."""
    row, column = saliency_peak(explanation.heatmap)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[column + 0.5, row + 0.5]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _empty_root(root: Dataset) -> hd.sr.ContainerContentItem:
    """A root container like ``root`` (same concept and template) with empty content."""
    concept = root.ConceptNameCodeSequence[0]
    template = root.ContentTemplateSequence[0].TemplateIdentifier
    shell = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept(
            concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning
        ),
        template_id=str(template),
    )
    shell.ContentSequence = hd.sr.ContentSequence([])
    return shell


def _result_statement(prediction: Prediction, spec: TaskSpec) -> str:
    """The study-level result as one sentence, first in the document's evaluations: what a
    document view (Weasis, dsr2html, the status page) shows before the groups' details."""
    scope = ""
    if prediction.fused_probabilities is not None:
        scope = f" (study level, fused {fused_view_names(prediction)})"
    return f"{spec.label}: {result_phrase(prediction, prediction.probabilities)}{scope}"


def _warning_statement(demo: bool) -> str:
    """What the content itself says of its use (not only the header's descriptions)."""
    text = "AI-generated result by orthonode: NOT FOR DIAGNOSTIC USE"
    if demo:
        text += "; DEMO WEIGHTS trained on synthetic phantoms, not for clinical use"
    return text


def _not_applicable_items(prediction: Prediction, spec: TaskSpec) -> list[hd.sr.ContentItem]:
    """What the Qualitative Evaluations container says of the images not answered on.

    No image analysed: the task's evaluation is Not applicable, one coded reason per distinct
    reason (in the order of NOT_APPLICABLE_REASONS) and one TEXT per image. Some analysed: a
    coded reason and a TEXT per excluded image. Nothing excluded: nothing.
    """
    excluded = prediction.not_applicable
    first = len(prediction.views) + 1  # excluded images are numbered after the analysed ones
    texts = [
        _comment(_not_applicable_comment(item, number))
        for number, item in enumerate(excluded, start=first)
    ]
    if prediction.applicable:
        return [
            item
            for reason, text in zip(excluded, texts, strict=True)
            for item in (_reason(reason.reason), text)
        ]
    used = {item.reason for item in excluded}
    return [
        hd.sr.CodeContentItem(
            name=_concept(spec.evaluation),
            value=_concept(NOT_APPLICABLE),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        *(_reason(reason) for reason in NOT_APPLICABLE_REASONS if reason in used),
        *texts,
    ]


def _not_applicable_comment(item: NotApplicable, number: int) -> str:
    """The Comment on one excluded image: what it is said to be, then the score that decided
    and its threshold (TID 1500's Qualitative Evaluations container holds no NUM)."""
    text = not_applicable_text(item, number)
    score = not_applicable_score(item)
    return text if score is None else f"{text}; {score}"


def _reason(reason: str) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(
        name=_concept(NOT_APPLICABLE_REASON),
        value=_concept(NOT_APPLICABLE_REASON_CODES[reason]),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=_COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _qualitative_evaluations(items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    """The root's Qualitative Evaluations container (C0034375, UMLS; TID 1500), holding coded
    evaluations (CODE) and comments (TEXT)."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(list(items))
    return container


def _placeholder_group(instance_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group that only lets highdicom build a report without any (removed right after)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(instance_uid, 0), identifier="placeholder"
        )
    )


def _remove_imaging_measurements(root: Dataset) -> None:
    """Remove the Imaging Measurements container from the report's root."""
    content = root.ContentSequence
    (index,) = [
        i
        for i, item in enumerate(content)
        if item.value_type == hd.sr.ValueTypeValues.CONTAINER
        and item.name == codes.DCM.ImagingMeasurements
    ]
    del content[index]


def _percent(
    name: hd.sr.CodedConcept, probability: float, frame: Dataset | None = None
) -> hd.sr.Measurement:
    coordinates = None
    if frame is not None:
        coordinates = [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=_corners(frame, None),
                source_image=hd.sr.SourceImageForRegion.from_source_image(frame),
            )
        ]
    return hd.sr.Measurement(
        name=name,
        value=percent_value(probability),
        unit=_PERCENT,
        referenced_coordinates=coordinates,
    )


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _coded(info: ClassInfo) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(info.code_value, info.coding_scheme, info.code_meaning)


def _tracking_uid(instance_uid: str, index: object) -> str:
    return str(generate_uid(entropy_srcs=[instance_uid, "tracking", str(index)]))


def _library_entry(header: Dataset) -> Dataset:
    """The attributes highdicom's Image Library reads, tolerant of a sparse source.

    highdicom picks the projection-radiography descriptors (TID 1603) by Modality and then
    requires Patient Orientation and Imager Pixel Spacing; without them the image is listed
    with the common descriptors only (the coded modality still comes from the SOP class).
    Other modalities are listed with the common descriptors too.
    """
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in header:
            setattr(entry, keyword, header[keyword].value)
    spacing = header.get("ImagerPixelSpacing") or header.get("PixelSpacing")
    orientation = header.get("PatientOrientation")
    orientation_ok = orientation is not None and len(orientation) == 2 and all(orientation)
    modality = header.get("Modality")
    if modality in _PROJECTION and spacing is not None and len(spacing) == 2 and orientation_ok:
        entry.Modality = modality
        entry.ImagerPixelSpacing = spacing
        entry.PatientOrientation = orientation
    else:
        entry.Modality = "OT"
    return entry


def _private_schemes(content: Sequence[Dataset]) -> set[str]:
    """Every private ("99...") coding scheme the content tree uses: in the spec's codes, the
    classes, or anywhere else a code is written."""
    return {
        str(item.CodingSchemeDesignator)
        for item in _walk(content)
        if str(item.get("CodingSchemeDesignator", "")).startswith("99")
    }


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        for element in item:
            if element.VR == "SQ":
                yield from _walk(element.value)


def _coding_schemes(private: set[str]) -> list[CodingSchemeIdentificationItem]:
    """Declarations of the private schemes used: ours with its name and organisation, a
    site's by its designator (the node does not know who is responsible for it)."""
    return [
        CodingSchemeIdentificationItem(
            designator=designator,
            name="orthonode private codes",
            responsible_organization="orthonode project",
        )
        if designator == PRIVATE_SCHEME
        else CodingSchemeIdentificationItem(designator=designator, name=designator)
        for designator in sorted(private)
    ]
