"""The status page for PACS administrators, at ``/`` on the node's HTTP port, and the facts
``python -m dicom_node status`` prints.

* :mod:`.report` — the node's SR read back: as text, as one summary line, as sections;
* :mod:`.model` — the read model: studies filtered and paged, a study's page, the problems,
  counts and warnings, read from the spool and the audit trail;
* :mod:`.health` — ready, degraded or not ready, and why (``/readyz`` too);
* :mod:`.html` — the pages, server-rendered; :mod:`.routes` — their routes and JSON API;
* :mod:`.images` — Secondary Captures as PNG; :mod:`.verify` — C-ECHO / HTTP checks of a
  destination; :mod:`.text` — the terminal's view.

Everything is read from the spool, so it survives a restart. Reading needs no token; actions
(requeue, check a destination) need the bearer token; the accession number and patient ID are
shown only to a request that carries a valid one, and never logged.
"""

from dicom_node.status.html import render
from dicom_node.status.report import sr_summary, sr_text
from dicom_node.status.routes import StatusPage

__all__ = ["StatusPage", "render", "sr_summary", "sr_text"]
