"""The status page's HTML, server-rendered from the read model's data (:mod:`.model`).

Three pages share one frame (the node's name, its health, the token field, the links): the
studies page at ``/`` (filters, counts, one line per study, the node's parts, dead letters),
a study's page at ``/studies/{StudyInstanceUID}`` and the problems view at ``/problems``.
Everything works without a script; ``status.js`` adds the live refresh, the buttons that need
the token (requeue, check a destination) and the identifiers a token may see.

Every value is escaped. States have one CSS class each (``s-answered``, ``s-dead-letter``,
...), health ``h-ready`` / ``h-degraded`` / ``h-not-ready``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from dicom_node.problems import KIND_LABELS
from dicom_node.status.health import DEGRADED, NOT_READY, READY
from dicom_node.status.model import MASK, PAGE_SIZES, STATE_LABELS, short_uid
from dicom_node.store import STUDY_FILTER_STATES

__all__ = [
    "counts_html",
    "health_html",
    "pager_html",
    "render",
    "render_error",
    "render_problems",
    "render_study",
    "study_rows_html",
]

_STATIC = resources.files("dicom_node") / "static"
_STYLE = (_STATIC / "status.css").read_text()
_SCRIPT = (_STATIC / "status.js").read_text()
_HEALTH_TEXT = {READY: "ready", DEGRADED: "degraded", NOT_READY: "NOT READY"}


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str, css: str = "") -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_s(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} s"


def _badge(state: str) -> str:
    label = STATE_LABELS.get(state, state)
    return f'<span class="badge s-{_e(state)}">{_e(label)}</span>'


def _kind(kind: str) -> str:
    return f'<span class="badge k-{_e(kind)}">{_e(KIND_LABELS.get(kind, kind))}</span>'


def _uid(uid: str, link: str | None = None) -> str:
    """A UID shortened, the whole one on hover; a link to its study page when given."""
    if not uid:
        return "–"
    code = f'<code class="uid" title="{_e(uid)}">{_e(short_uid(uid))}</code>'
    return f'<a href="{_e(link)}">{code}</a>' if link else code


def _identifier(value: str | None) -> str:
    if value is None:
        return f'<span class="masked" title="needs a valid token">{MASK}</span>'
    return _e(value) if value else "–"


def _short_time(text: str) -> str:
    """'2026-12-08 01:04:38 UTC' as '12-08 01:04:38' (the year and zone are in the title)."""
    return text[5:19] if len(text) >= 19 else text


# -- the frame ----------------------------------------------------------------------------------


def _health(s: Mapping[str, Any]) -> dict[str, Any]:
    """The page's health: the model's, or (an older snapshot) from ``ready`` alone."""
    found = s.get("health")
    if found:
        return dict(found)
    return {"state": READY if s.get("ready") else NOT_READY, "warnings": []}


def health_html(health: Mapping[str, Any]) -> str:
    """The header's health word and its warnings (replaced by the live refresh)."""
    state = str(health.get("state", READY))
    word = (
        f'<span id="health-state" class="health h-{state.replace(" ", "-")}">'
        f"{_e(_HEALTH_TEXT.get(state, state))}</span>"
    )
    warnings = "".join(f"<li>{_e(w)}</li>" for w in health.get("warnings", []))
    box = f'<ul class="warnings">{warnings}</ul>' if warnings else ""
    return word + box


def _frame(title: str, node: Mapping[str, Any], health: Mapping[str, Any], body: str) -> str:
    demo = node.get("demo")
    warning = (
        '<div class="demo"><b>Demo weights: not for clinical use.</b> The models were trained '
        "on synthetic phantoms; every output they make says so.</div>"
        if demo
        else ""
    )
    ae = _e(node.get("ae_title", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)} — orthonode {ae}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>
<header><h1><a href="/">orthonode {ae}</a> — <span id="health-box">{health_html(health)}</span></h1>
<nav><a href="/">studies</a> · <a href="/problems">problems</a> · <a href="/api/status">JSON</a> ·
<a href="/metrics">metrics</a> · <a href="/readyz">readyz</a>
<span class="token"><label>token <input id="token" type="password" size="22"
 autocomplete="off" onchange="saveToken()"></label>
<span class="hint">(requeue, checks; shows accession and patient ID)</span></span></nav>
</header>
{warning}
{body}
</body></html>
"""


def render_error(title: str, message: str, node: Mapping[str, Any]) -> str:
    """A page that says what was wrong with the request (a bad filter, an unknown study)."""
    body = f'<h2>{_e(title)}</h2><p class="error">{_e(message)}</p><p><a href="/">back</a></p>'
    return _frame(title, node, {"state": READY, "warnings": []}, body)


# -- the studies page ---------------------------------------------------------------------------


def _sends(sends: Mapping[str, Mapping[str, int]]) -> tuple[str, str]:
    """Per destination, compact (✓ sent, ✗ dead, … pending) and in words (for the title)."""
    marks = {"sent": "✓", "dead": "✗", "pending": "…"}
    short, words = [], []
    for destination, counts in sends.items():
        each = " ".join(
            f'<span class="o-{_e(k)}">{marks.get(k, "")}{n}{"" if k == "sent" else " " + _e(k)}'
            "</span>"
            for k, n in sorted(counts.items(), key=lambda kv: kv[0] != "sent")
        )
        short.append(f"{_e(destination)} {each}")
        words.append(f"{destination}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return " · ".join(short) or "–", "; ".join(words)


def _study_line(st: Mapping[str, Any]) -> str:
    """Date and time · modality and body part · views, as one phrase."""
    when = " ".join(x for x in (st.get("study_date"), st.get("study_time")) if x)
    what = " ".join(x for x in (st.get("modality"), st.get("body_part")) if x)
    views = ", ".join(st.get("views") or [])
    return " · ".join(_e(x) for x in (when, what, views) if x) or "–"


def study_rows_html(studies: Sequence[Mapping[str, Any]]) -> str:
    """The ``<tr>`` of each study (the live refresh replaces them)."""
    rows = []
    for st in studies:
        uid = str(st["study_instance_uid"])
        link = st.get("link") or f"/studies/{uid}"
        states = st.get("states") or [st.get("state", "")]
        result = str(st.get("result") or "")
        sent, sent_words = _sends(st.get("sends") or {})
        t = st.get("timings") or {}
        timing = (
            f"wait {_fmt_s(t.get('wait_s'))}, analysis {_fmt_s(t.get('analysis_s'))}, "
            f"send {_fmt_s(t.get('send_s'))}, total {_fmt_s(t.get('end_to_end_s'))}"
        )
        cells = [
            f'<td class="when" title="{_e(st.get("received"))}">'
            f"{_e(_short_time(str(st.get('received') or ''))[:11])}</td>",
            f'<td class="what">{_study_line(st)}</td>',
            f'<td class="task">{_e(st.get("task"))} v{_e(st.get("version"))}</td>',
            '<td class="state">' + " ".join(_badge(s) for s in states) + "</td>",
            f'<td class="result" title="{_e(result)}; {_e(timing)}">{_e(result) or "–"}</td>',
            f'<td class="sent" title="{_e(sent_words)}">{sent}</td>',
            f'<td class="uid-cell">{_uid(uid, link)}</td>',
            f'<td class="ident accession">{_identifier(st.get("accession_number"))}</td>',
            f'<td class="ident patient">{_identifier(st.get("patient_id"))}</td>',
        ]
        key = f"{uid}/{st.get('task')}"
        rows.append(f'<tr class="study" data-key="{_e(key)}">' + "".join(cells) + "</tr>")
    return "".join(rows)


def _studies_table(studies: Sequence[Mapping[str, Any]], empty: str) -> str:
    headers = [
        "received",
        "study",
        "task",
        "state",
        "result",
        "sent",
        "UID",
        "accession",
        "patient ID",
    ]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = study_rows_html(studies)
    hidden = "" if studies else ' style="display:none"'
    note = "" if studies else f'<p class="empty" id="no-studies">{_e(empty)}</p>'
    return (
        f'<table class="studies" id="studies"{hidden}><thead><tr>{head}</tr></thead>'
        f'<tbody id="study-rows">{body}</tbody></table>{note}'
    )


def pager_html(listing: Mapping[str, Any]) -> str:
    """'1–25 of 132' and the links to the pages before and after."""
    total, page, pages = listing["total"], listing["page"], listing["pages"]
    query = dict(listing.get("query") or {})

    def link(number: int, text: str) -> str:
        params = {**query, "page": str(number)}
        if number == 1:
            params.pop("page")
        return f'<a href="/?{_e(urlencode(params))}" rel="{text.split()[0]}">{_e(text)}</a>'

    where = f"{listing['first']}–{listing['last']} of {total}" if total else "0 of 0"
    parts = [f'<span class="range">{where}</span>']
    parts.append(
        link(page - 1, "‹ previous") if page > 1 else '<span class="off">‹ previous</span>'
    )
    parts.append(f"page {page} of {pages}")
    parts.append(link(page + 1, "next ›") if page < pages else '<span class="off">next ›</span>')
    return " · ".join(parts)


def counts_html(counts: Mapping[str, Any]) -> str:
    """Studies by state (each a link to that filter), the outbox, the problems of 24 h."""
    studies = counts.get("studies") or {}
    parts = []
    for state in STUDY_FILTER_STATES:
        n = studies.get(state, 0)
        label = STATE_LABELS.get(state, state)
        parts.append(
            f'<a class="count c-{state}{" zero" if not n else ""}" href="/?state={state}">'
            f'{_e(label)} <b data-count="{state}">{n}</b></a>'
        )
    outbox = counts.get("outbox") or {}
    line = ", ".join(f"{k} {outbox.get(k, 0)}" for k in ("pending", "sent", "dead"))
    problems = sum((counts.get("problems_24h") or {}).values())
    parts.append(f'<span class="count">outbox: {_e(line)}</span>')
    parts.append(
        f'<a class="count c-problem{" zero" if not problems else ""}" href="/problems">'
        f'refused or ignored (24 h) <b data-count="problems">{problems}</b></a>'
    )
    return " ".join(parts)


def _filters(s: Mapping[str, Any]) -> str:
    query = dict(s.get("query_values") or {})
    tasks = s.get("tasks") or sorted({m["task"] for m in s.get("models", [])})

    def options(values: Sequence[str], chosen: str, labels: Mapping[str, str]) -> str:
        found = ['<option value="">any</option>']
        for value in values:
            mark = " selected" if value == chosen else ""
            found.append(
                f'<option value="{_e(value)}"{mark}>{_e(labels.get(value, value))}</option>'
            )
        return "".join(found)

    size = str(query.get("size", "25"))
    sizes = "".join(
        f"<option{' selected' if str(n) == size else ''}>{n}</option>"
        for n in sorted({*PAGE_SIZES, int(size) if size.isdigit() else 25})
    )
    return f"""<form class="filters" id="filters" method="get" action="/">
<label>UID <input name="uid" size="28" value="{_e(query.get("uid", ""))}"
 placeholder="part of a study, series or SOP UID"></label>
<label>task <select name="task">{
        options(list(tasks), str(query.get("task", "")), {})
    }</select></label>
<label>state <select name="state">{
        options(STUDY_FILTER_STATES, str(query.get("state", "")), STATE_LABELS)
    }</select></label>
<label>received from <input type="date" name="from" value="{_e(query.get("from", ""))}"></label>
<label>to <input type="date" name="to" value="{_e(query.get("to", ""))}"></label>
<label>per page <select name="size">{sizes}</select></label>
<button type="submit">filter</button> <a href="/">clear</a>
<label class="live"><input type="checkbox" id="live" checked onchange="saveLive()"> live</label>
</form>"""


def _destinations(s: Mapping[str, Any]) -> str:
    rows = []
    for n, d in enumerate(s.get("destinations", [])):
        last = d.get("check")
        result = ""
        if last:
            css = "ok" if last["ok"] else "bad"
            result = (
                f'<span class="{css}">{_e(last["result"])}</span> '
                f"({last['ms']} ms, {_e(last.get('when', ''))})"
            )
        rows.append(
            [
                _e(d["name"]),
                _e(d["type"]),
                _e(d["target"]),
                "yes" if d["tls"] else "no",
                f'<button class="check" data-n="{n}" onclick="checkDestination({n})">'
                f"{'C-ECHO' if d['type'] == 'dimse' else 'check'}</button> "
                f'<span class="check-result" id="check-{n}">{result}</span>',
            ]
        )
    return _table(
        ["name", "type", "target", "TLS", "check"],
        rows,
        "No destinations: results stay in the spool and on this page (destinations: in "
        "conf.yaml sends them to the PACS).",
    )


def _dead_letters(dead: Sequence[Mapping[str, Any]], limit: int | None = None) -> str:
    shown = list(dead if limit is None else dead[:limit])
    rows = [
        [
            _e(d["id"]),
            _uid(str(d["study_instance_uid"]), f"/studies/{d['study_instance_uid']}"),
            _e(d.get("task", "")),
            _e(d["file"]),
            _e(d["destination"]),
            _e(d["attempts"]),
            f'<span class="error-text">{_e(d["error"])}</span>',
            _e(_short_time(str(d.get("since") or ""))),
            f'<button class="requeue" data-id="{d["id"]}" '
            f"onclick=\"requeue('/api/dead-letters/{d['id']}/requeue')\">requeue</button>",
        ]
        for d in shown
    ]
    table = _table(
        ["id", "study", "task", "file", "destination", "attempts", "last error", "since", ""],
        rows,
        "No dead letters.",
    )
    more = ""
    if limit is not None and len(dead) > limit:
        more = (
            f"<p>and {len(dead) - limit} more: "
            '<a href="/problems?kind=dead-letter">all dead letters</a></p>'
        )
    buttons = (
        '<p><button id="requeue-all" onclick="requeue(\'/api/dead-letters/requeue\')">'
        'requeue all</button> <span id="requeue-result"></span></p>'
        if rows
        else '<p><span id="requeue-result"></span></p>'
    )
    return table + more + buttons


def _parts(s: Mapping[str, Any]) -> str:
    """Health checks, models, peers, destinations: the node's parts."""
    checks = _table(
        ["part", "state"],
        [
            [_e(name), '<span class="ok">ok</span>' if v == "ok" else _e("; ".join(v))]
            for name, v in s.get("checks", {}).items()
        ],
        "no checks",
    )
    models = _table(
        ["task", "model", "version", "sha256", "views"],
        [
            [
                _e(m["task"]),
                _e(m["name"]),
                _e(m["version"]) + (" (demo)" if m["demo"] else ""),
                f"<code>{_e(m['sha256'][:16])}…</code>",
                _e(", ".join(m["views"])),
            ]
            for m in s.get("models", [])
        ],
        "no models loaded",
    )
    peers = _table(
        ["calling AE", "host"],
        [[_e(p["ae_title"]), _e(p["host"])] for p in s.get("peers", [])],
        "Any calling AE may send (peers: is empty).",
    )
    return f"""<section class="parts">
<div><h2>Health</h2>{checks}</div>
<div><h2>Models</h2>{models}</div>
<div><h2>Peers</h2>{peers}</div>
</section>
<h2>Destinations</h2>{_destinations(s)}"""


def render(s: Mapping[str, Any]) -> str:
    """The studies page from :meth:`~dicom_node.status.StatusPage.snapshot` (and, when the
    page is asked for with filters, its ``listing``, ``counts`` and ``query_values``)."""
    node = dict(s["node"])
    node.setdefault("demo", any(m.get("demo") for m in s.get("models", [])))
    health = _health(s)
    listing = s.get("listing")
    studies = listing["studies"] if listing else s.get("studies", [])
    pager = f'<p class="pager" id="pager">{pager_html(listing)}</p>' if listing else ""
    counts = s.get("counts")
    if counts is None:
        queues = s.get("queues", {})
        line = ", ".join(f"{k} {v}" for k, v in sorted(queues.get("studies", {}).items()))
        outbox = ", ".join(f"{k} {v}" for k, v in sorted(queues.get("outbox", {}).items()))
        counts_line = f"studies: {_e(line or 'none')}; outbox: {_e(outbox or 'empty')}"
    else:
        counts_line = counts_html(counts)
    error = s.get("error")
    error_html = f'<p class="error">{_e(error)}</p>' if error else ""
    api = s.get("api")
    live = f' data-api="{_e(api)}"' if api else ""
    tls = " (TLS)" if node.get("tls") else ""
    empty = (
        "No study matches these filters."
        if s.get("query_values", {}).keys() - {"size"}
        else "No studies yet: send one (python -m dicom_node send, storescu, or STOW-RS)."
    )
    body = f"""<p class="node">DICOM port {_e(node.get("dicom_port"))}{tls}; image check
{_e(node.get("image_check"))}</p>
<section id="live-area"{live}>
<p class="counts" id="counts">{counts_line}</p>
<h2>Studies</h2>
{_filters(s)}
{error_html}
{pager}
{_studies_table(studies, empty)}
</section>
<h2>Dead letters</h2>
{_dead_letters(s.get("dead_letters", []), limit=s.get("dead_letter_limit"))}
{_parts(s)}
"""
    return _frame("studies", node, health, body)


# -- a study's page -----------------------------------------------------------------------------


def _facts(d: Mapping[str, Any]) -> str:
    rows = [
        ("Study Instance UID", f"<code>{_e(d['study_instance_uid'])}</code>"),
        (
            "study date and time",
            _e(" ".join(x for x in (d.get("study_date"), d.get("study_time")) if x)) or "–",
        ),
        (
            "modality, body part",
            _e(" ".join(x for x in (d.get("modality"), d.get("body_part")) if x)) or "–",
        ),
        ("accession number", _identifier(d.get("accession_number"))),
        ("patient ID", _identifier(d.get("patient_id"))),
    ]
    fields = {"accession number": "accession_number", "patient ID": "patient_id"}
    body = "".join(
        f'<tr><th>{_e(k)}</th><td data-field="{fields.get(k, "")}">{v}</td></tr>' for k, v in rows
    )
    api = f"/api/studies/{d['study_instance_uid']}"
    return f'<table class="facts" id="identifiers" data-api="{_e(api)}">{body}</table>'


def _sr_html(sr: Mapping[str, Any] | None) -> str:
    if not sr:
        return '<p class="empty">No report for this version.</p>'
    sections = sr.get("sections")
    if sections is None:
        return f'<p class="error">{_e(sr.get("title"))}</p>'
    parts = [f'<h3 class="sr-title">{_e(sr["title"])}</h3>']
    for section in sections:
        rows = "".join(
            f'<tr class="depth-{min(int(r["depth"]), 4)}"><th>{_e(r["name"])}</th>'
            f"<td>{_e(r['value'])}</td></tr>"
            for r in section["rows"]
        )
        table = f'<table class="kv">{rows}</table>'
        title = _e(section["title"])
        if section["kind"] in ("detail", "library", "document"):
            parts.append(
                f'<details class="sr-{section["kind"]}"><summary>{title}</summary>{table}</details>'
            )
        else:
            parts.append(f'<section class="sr-{section["kind"]}"><h4>{title}</h4>{table}</section>')
    return '<div class="sr">' + "".join(parts) + "</div>"


def _task_section(t: Mapping[str, Any]) -> str:
    badges = " ".join(_badge(s) for s in t.get("states", [t.get("state", "")]))
    timing = t.get("timings") or {}
    captures = "".join(
        f'<figure><a href="{_e(c["full"])}" target="_blank">'
        f'<img class="sc" alt="Secondary Capture {c["n"]}" src="{_e(c["full"])}"></a>'
        f"<figcaption>Secondary Capture {c['n']} (full size: open it alone)</figcaption></figure>"
        for c in t.get("captures", [])
    )
    captures = captures or '<p class="empty">No Secondary Capture for this version.</p>'
    report = f' · <a href="{_e(t["report"])}">SR as text</a>' if t.get("report") else ""
    outbox = _table(
        ["id", "destination", "file", "state", "attempts", "last error", "queued", "last attempt"],
        [
            [
                _e(o["id"]),
                _e(o["destination"]),
                _e(o["file"]),
                f'<span class="o-{_e(o["state"])}">{_e(o["state"])}</span>',
                _e(o["attempts"]),
                _e(o["error"] or ""),
                _e(o["queued"]),
                _e(o["updated"]),
            ]
            for o in t.get("outbox", [])
        ],
        "Nothing queued to send.",
    )
    return f"""<section class="task" id="task-{_e(t["task"])}">
<h2>{_e(t["task"])} v{_e(t["version"])} {badges}</h2>
<p class="result"><b>{_e(t.get("result") or "–")}</b></p>
<p class="timings">received {_e(t.get("received"))}; waiting {_fmt_s(timing.get("wait_s"))},
analysis {_fmt_s(timing.get("analysis_s"))}, sending {_fmt_s(timing.get("send_s"))}, in all
{_fmt_s(timing.get("end_to_end_s"))}{report}</p>
<h3>Structured Report</h3>{_sr_html(t.get("sr"))}
<h3>Secondary Captures</h3><div class="captures">{captures}</div>
<h3>Sends</h3>{outbox}
</section>"""


def _problem_rows(problems: Sequence[Mapping[str, Any]], link: bool = True) -> list[list[str]]:
    rows = []
    for p in problems:
        study = str(p.get("study_instance_uid") or "")
        who = " ".join(
            x for x in (p.get("peer"), f"@ {p['address']}" if p.get("address") else "") if x
        )
        rows.append(
            [
                f'<span title="{_e(p["at"])}">{_e(_short_time(str(p["at"])))}</span>',
                _kind(str(p["kind"])),
                _e(p["reason"]),
                _e(p.get("status") or "–"),
                _e(who or "–")
                + (f" <small>{_e(p['protocol'])}</small>" if p.get("protocol") else ""),
                _uid(study, f"/studies/{study}" if link and study else None),
                _uid(str(p.get("series_instance_uid") or "")),
                _uid(str(p.get("sop_instance_uid") or "")),
            ]
        )
    return rows


_PROBLEM_HEADERS = ["when", "kind", "reason", "status", "from", "study", "series", "SOP instance"]


def render_study(d: Mapping[str, Any], node: Mapping[str, Any], health: Mapping[str, Any]) -> str:
    """A study's page from :meth:`~dicom_node.status.model.StatusModel.study`."""
    tasks = "".join(_task_section(t) for t in d.get("tasks", [])) or (
        '<p class="empty">No task was run on this study (see its instances and problems).</p>'
    )
    instances = _table(
        [
            "SOP instance",
            "series",
            "SOP class",
            "modality, body part",
            "view",
            "side",
            "routed to",
            "from",
            "received",
        ],
        [
            [
                _uid(str(i["sop_instance_uid"])),
                _uid(str(i["series_instance_uid"])),
                _e(i["sop_class"]),
                _e(" ".join(x for x in (i.get("modality"), i.get("body_part")) if x) or "–"),
                _e(i.get("view") or "–"),
                _e(i.get("laterality") or "–"),
                _e(i["routed"]),
                _e(i.get("calling_ae") or "–"),
                _e(i["received"]),
            ]
            for i in d.get("instances", [])
        ],
        "No instance of this study is stored.",
    )
    problems = _table(_PROBLEM_HEADERS, _problem_rows(d.get("problems", []), link=False), "None.")
    audit = d.get("audit") or {}
    if audit.get("file") is None:
        audit_html = '<p class="empty">The audit trail is off (audit.enabled: false).</p>'
    else:
        audit_html = _table(
            ["time", "event", "details"],
            [
                [
                    _e(e["time"]),
                    _e(e["event"]),
                    _e(", ".join(f"{k}={v}" for k, v in e["details"].items())),
                ]
                for e in audit.get("events", [])
            ],
            f"No line about this study in {audit['file']}.",
        )
        if audit.get("truncated"):
            audit_html += '<p class="hint">(the end of the current audit file only)</p>'
    uid = str(d["study_instance_uid"])
    title = f'<code title="{_e(uid)}">{_e(short_uid(uid, 24))}</code>'
    body = f"""<h2 class="study-title">Study {title}</h2>
{_facts(d)}
{tasks}
<h2>Instances received</h2>{instances}
<h2>Refused or ignored</h2>{problems}
<h2>Audit trail</h2>{audit_html}
<p><a href="/">all studies</a></p>"""
    return _frame(f"study {short_uid(str(d['study_instance_uid']))}", node, health, body)


# -- the problems view --------------------------------------------------------------------------


def render_problems(
    p: Mapping[str, Any], node: Mapping[str, Any], health: Mapping[str, Any]
) -> str:
    """The problems view from :meth:`~dicom_node.status.model.StatusModel.problems`."""
    query = dict(p.get("query") or {})
    chosen = query.get("kind", "")
    chips = " ".join(
        f'<a class="count c-{kind if kind in ("failed", "dead-letter") else "problem"}'
        f'{" zero" if not n else ""}{" chosen" if kind == chosen else ""}" '
        f'href="/problems?kind={kind}">{_e(KIND_LABELS[kind])} <b data-kind="{kind}">{n}</b></a>'
        for kind, n in p["counts"].items()
    )
    options = "".join(
        f'<option value="{k}"{" selected" if k == chosen else ""}>{_e(label)}</option>'
        for k, label in KIND_LABELS.items()
    )
    form = f"""<form class="filters" method="get" action="/problems">
<label>kind <select name="kind"><option value="">any</option>{options}</select></label>
<label>UID <input name="uid" size="28" value="{_e(query.get("uid", ""))}"></label>
<label>from <input type="date" name="from" value="{_e(query.get("from", ""))}"></label>
<label>to <input type="date" name="to" value="{_e(query.get("to", ""))}"></label>
<button type="submit">filter</button> <a href="/problems">clear</a></form>"""
    sections = []
    if chosen not in ("failed", "dead-letter"):
        total, page, pages = p["total"], p["page"], p["pages"]

        def link(number: int, text: str) -> str:
            params = {**query, "page": str(number)}
            return f'<a href="/problems?{_e(urlencode(params))}">{_e(text)}</a>'

        pager = " · ".join(
            [
                f"{total} kept",
                link(page - 1, "‹ previous") if page > 1 else '<span class="off">‹ previous</span>',
                f"page {page} of {pages}",
                link(page + 1, "next ›") if page < pages else '<span class="off">next ›</span>',
            ]
        )
        table = _table(
            _PROBLEM_HEADERS,
            _problem_rows(p.get("problems", [])),
            "Nothing refused or ignored.",
            "problems",
        )
        sections.append(
            f'<h2 id="refused">Refused or ignored instances</h2><p class="pager">{pager}</p>{table}'
        )
    if chosen in ("", "failed"):
        failed = _table(
            ["study", "task", "since", "reason"],
            [
                [
                    _uid(str(f["study_instance_uid"]), f"/studies/{f['study_instance_uid']}"),
                    f"{_e(f['task'])} v{_e(f['version'])}",
                    _e(f["since"]),
                    f'<span class="error-text">{_e(f["error"])}</span>',
                ]
                for f in p.get("failed", [])
            ],
            "No failed study.",
        )
        sections.append(f'<h2 id="failed">Failed studies</h2>{failed}')
    if chosen in ("", "dead-letter"):
        sections.append(
            f'<h2 id="dead-letters">Dead letters</h2>{_dead_letters(p.get("dead_letters", []))}'
        )
    body = f"""<h2>Problems</h2>
<p class="hint">What the node refused or ignored (the newest are kept), the studies that failed
and the results that could not be delivered. A study answered "not applicable" is a result, not
a problem: it is on the studies page.</p>
<p class="counts">{chips}</p>
{form}
{"".join(sections)}"""
    return _frame("problems", node, health, body)
