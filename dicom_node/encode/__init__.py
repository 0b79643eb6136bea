"""Encoders of the node's outputs: the TID 1500 SR, the saliency Secondary Capture and the
saliency Segmentation.

Only this package knows about highdicom. The builders take the plain dataclasses of
:mod:`dicom_node.domain`, the task's :class:`~dicom_node.tasks.TaskSpec` and pydicom data sets,
and return data sets ready to write. :mod:`.sr`, :mod:`.sc` and :mod:`.seg` build the three
IODs, :mod:`.overlay` draws the Secondary Capture's pixels and :mod:`.common` holds what they
share (header, equipment, checks, wording); none of :mod:`.sr`, :mod:`.sc` and :mod:`.seg`
imports another.
"""

from dicom_node.encode.sc import build_secondary_capture
from dicom_node.encode.seg import build_segmentation
from dicom_node.encode.sr import build_structured_report

__all__ = ["build_secondary_capture", "build_segmentation", "build_structured_report"]
