"""The HTTP port's small parts: bearer tokens, who may write, the spool's added column, and the
status page's HTML escaping what it shows."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dicom_node.http import Tokens, writer
from dicom_node.status import render
from dicom_node.store import Spool


def test_tokens_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\nroom-3 abc123\n\nlonely-token  # trailing comment\n")
    tokens = Tokens(path, environ={"ORTHONODE_HTTP_TOKENS": "e1, e2"})
    assert tokens.configured
    assert tokens.name("abc123") == "room-3"
    assert tokens.name("lonely-token") == "token-4"
    assert tokens.name("e2") == "env-2"
    assert tokens.name("abc12") is None and tokens.name("") is None
    path.write_text("other\n")
    os.utime(path, (1, 1))
    assert tokens.name("abc123") is None and tokens.name("other") == "token-1"
    # A file that went away: none of its tokens is accepted any more (and an error is logged).
    path.unlink()
    assert tokens.name("other") is None and tokens.configured
    assert not Tokens(None, environ={}).configured
    with pytest.raises(OSError, match="tokens_file"):
        Tokens(tmp_path / "missing", environ={})


def _request(host: str, authorization: str | None = None) -> Any:
    headers = {} if authorization is None else {"authorization": authorization}
    return SimpleNamespace(headers=headers, client=SimpleNamespace(host=host))


def test_who_may_write() -> None:
    none = Tokens(None, environ={})
    assert writer(_request("127.0.0.1"), none) == ("local", None)
    assert writer(_request("::1"), none) == ("local", None)
    name, refusal = writer(_request("10.1.2.3"), none)
    assert name is None and refusal is not None and refusal.status_code == 403
    some = Tokens(None, environ={"ORTHONODE_HTTP_TOKENS": "t0k"})
    # With tokens configured, loopback is no exception.
    assert writer(_request("127.0.0.1"), some)[1].status_code == 401  # type: ignore[union-attr]
    assert writer(_request("10.1.2.3", "Bearer t0k"), some) == ("env-1", None)
    assert writer(_request("10.1.2.3", "bearer t0k"), some) == ("env-1", None)
    assert writer(_request("10.1.2.3", "Basic t0k"), some)[1].status_code == 401  # type: ignore[union-attr]
    assert writer(_request("10.1.2.3", "Bearer nope"), some)[1].status_code == 401  # type: ignore[union-attr]


def test_an_old_spool_gets_the_new_column(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    db = sqlite3.connect(root / "orthonode.sqlite")
    db.execute(
        "CREATE TABLE studies (study_instance_uid TEXT NOT NULL, task TEXT NOT NULL, "
        "state TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 1, last_received_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, error TEXT, PRIMARY KEY (study_instance_uid, task))"
    )
    db.execute("INSERT INTO studies VALUES ('1.2.3', 'knee', 'done', 1, 10.0, 12.0, NULL)")
    db.commit()
    db.close()
    spool = Spool(root)
    [state] = spool.recent_studies()
    assert (state.study_instance_uid, state.updated_at, state.claimed_at) == ("1.2.3", 12.0, None)
    spool.close()
    Spool(root).close()  # opening it again adds nothing twice


def test_the_page_escapes_what_it_shows() -> None:
    snapshot: dict[str, Any] = {
        "node": {"ae_title": "ORTHO<1>", "dicom_port": 11112, "tls": False, "image_check": "on"},
        "ready": False,
        "checks": {"spool": ["disk: <full>"]},
        "models": [],
        "peers": [{"ae_title": "A&B", "host": "any"}],
        "destinations": [],
        "queues": {"studies": {}, "outbox": {}},
        "studies": [
            {
                "study_instance_uid": "1.2.3",
                "task": "knee",
                "state": "failed",
                "version": 1,
                "received": "",
                "result": "failed: <script>alert(1)</script>",
                "timings": dict.fromkeys(("wait_s", "analysis_s", "send_s", "end_to_end_s")),
                "sends": {},
                "report": None,
                "thumbnails": [],
            }
        ],
        "dead_letters": [],
    }
    page = render(snapshot)
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "ORTHO&lt;1&gt;" in page and "A&amp;B" in page and "disk: &lt;full&gt;" in page
    assert "NOT READY" in page and "No dead letters." in page


def test_health_from_many_threads_at_once(tmp_path: Path) -> None:
    """Every caller probes the spool with a file of its own: none sees another's probe vanish."""
    from concurrent.futures import ThreadPoolExecutor

    spool = Spool(tmp_path / "spool")
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda _: spool.health(), range(400)))
    spool.close()
    assert all(p == [] for p in problems), [p for p in problems if p][:3]
    assert not list((tmp_path / "spool" / "instances").iterdir())  # no probe left behind


def test_a_cross_site_page_cannot_write() -> None:
    none = Tokens(None, environ={})
    request = _request("127.0.0.1")
    request.headers.update({"origin": "http://evil.example", "host": "127.0.0.1:8080"})
    assert writer(request, none)[1].status_code == 403  # type: ignore[union-attr]
    request.headers["origin"] = "http://127.0.0.1:8080"
    assert writer(request, none) == ("local", None)
