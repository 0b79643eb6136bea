"""Encoders of the node's outputs: the TID 1500 SR and the saliency Secondary Capture.

Only this package knows about highdicom. Both builders take the plain dataclasses of
:mod:`dicom_node.domain`, the task's :class:`~dicom_node.tasks.TaskSpec` and pydicom data sets,
and return data sets ready to write. :mod:`.sr` and :mod:`.sc` build the two IODs,
:mod:`.overlay` draws the Secondary Capture's pixels and :mod:`.common` holds what both share
(header, equipment, checks, wording); :mod:`.sr` never imports :mod:`.sc`.
"""

from dicom_node.encode.sc import build_secondary_capture
from dicom_node.encode.sr import build_structured_report

__all__ = ["build_secondary_capture", "build_structured_report"]
