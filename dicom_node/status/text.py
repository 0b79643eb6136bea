"""What ``python -m dicom_node status`` prints: the status page's facts, in a terminal.

Health with its warnings, the queues, the recent studies (state, result or reason, the study
UID), the newest problems, and the dead letters with their study and task. The accession
number and patient ID are never printed: a terminal's scroll-back and a pasted report keep
what they show.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicom_node.problems import KIND_LABELS
from dicom_node.status.health import Health
from dicom_node.status.model import STATE_LABELS, ProblemQuery, StatusModel, StudyQuery
from dicom_node.store import STUDY_FILTER_STATES

__all__ = ["status_lines"]


def _states(row: Mapping[str, Any]) -> str:
    return " + ".join(STATE_LABELS.get(s, s) for s in row["states"])


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def status_lines(
    model: StatusModel,
    health: Health,
    *,
    node_answer: str,
    state: str = "",
    task: str = "",
    limit: int = 20,
    problems: int = 10,
) -> list[str]:
    """The lines to print. ``health``: the running node's (from its ``/readyz``) or the
    spool's alone; ``node_answer`` says which."""
    config = model.config
    lines = [f"orthonode {config.node.ae_title}: {health.state}  ({node_answer})"]
    for name, found in health.checks.items():
        for problem in found:
            lines.append(f"  not ready: {name}: {problem}")
    for warning in health.warnings:
        lines.append(f"  warning: {warning}")
    counts = model.counts()
    studies = counts["studies"]
    lines.append(
        "studies: "
        + ", ".join(f"{STATE_LABELS[s]} {studies.get(s, 0)}" for s in STUDY_FILTER_STATES)
    )
    outbox = counts["outbox"]
    lines.append(
        "outbox: " + ", ".join(f"{k} {outbox.get(k, 0)}" for k in ("pending", "sent", "dead"))
    )
    recent = counts["problems_24h"]
    if recent:
        lines.append(
            "refused or ignored in 24 h: "
            + ", ".join(f"{KIND_LABELS.get(k, k)} {n}" for k, n in sorted(recent.items()))
        )

    query = StudyQuery(state=state, task=task, size=limit)
    listing = model.studies(query)
    chosen = ", ".join(x for x in (task, STATE_LABELS.get(state, state)) if x)
    lines.append("")
    lines.append(
        f"studies{f' ({chosen})' if chosen else ''}, most recent first: "
        f"{len(listing['studies'])} of {listing['total']}"
    )
    for row in listing["studies"]:
        what = " ".join(x for x in (row["modality"], row["body_part"]) if x)
        lines.append(
            f"  {row['received'][:19]}  {row['study_instance_uid']}  "
            f"{row['task']} v{row['version']}  {_states(row)}"
        )
        detail = "; ".join(x for x in (what, row["result"]) if x)
        if detail:
            lines.append(f"      {_clip(detail, 160)}")

    if problems:
        page = model.problems(ProblemQuery(size=problems))
        lines.append("")
        lines.append(f"problems, newest first: {len(page['problems'])} of {page['total']} kept")
        for p in page["problems"]:
            who = " ".join(x for x in (p["protocol"], p["peer"], p["address"]) if x)
            lines.append(
                f"  {p['at'][:19]}  {p['kind']:<15} {p['status'] or '-':<7} {who or '-'}: "
                f"{_clip(p['reason'], 100)}"
            )
            uids = ", ".join(
                f"{label} {p[key]}"
                for label, key in (
                    ("study", "study_instance_uid"),
                    ("series", "series_instance_uid"),
                    ("SOP", "sop_instance_uid"),
                )
                if p[key]
            )
            if uids:
                lines.append(f"      {uids}")
        for failed in page["failed"][:problems]:
            lines.append(
                f"  failed: study {failed['study_instance_uid']} {failed['task']} "
                f"v{failed['version']} since {failed['since'][:19]}: {failed['error']}"
            )

    dead = model.dead_letters()
    lines.append("")
    lines.append(f"dead letters: {len(dead)}")
    for item in dead:
        lines.append(
            f"  dead #{item['id']}: study {item['study_instance_uid']} {item['task']} "
            f"{item['file']} -> {item['destination']} ({item['attempts']} attempt(s), "
            f"since {item['since'][:19]}): {item['error']}"
        )
    if dead:
        lines.append("  requeue: python -m dicom_node send --retry-dead, or the status page")
    return lines
