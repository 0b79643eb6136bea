"""``python -m dicom_node serve | echo | check-config | status | send --retry-dead | reload |
migrate``.

``status`` prints what the status page shows, from the spool (and the running node's
``/readyz`` when it answers on ``node.http_port``): health with its warnings, the queues, the
recent studies with their state and result or reason, the problems, and the dead letters with
their study and task; ``--state``, ``--task`` and ``--limit`` filter the studies.

``migrate`` brings the spool's index to the schema this release uses (as ``serve`` does when it
opens the spool) and prints its schema version before and after; run again, it changes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from dicom_node.audit import open_audit
from dicom_node.config import Config, load_config, parse_ae_address
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import configure as configure_logs
from dicom_node.store import STUDY_FILTER_STATES
from dicom_node.tls import client_context, server_context

__all__ = ["main"]

log = logging.getLogger("dicom_node")
PID_FILE = "orthonode.pid"
_DEFAULT_CONFIG = Path("conf.yaml")


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and _DEFAULT_CONFIG.is_file():
        path = _DEFAULT_CONFIG
    return load_config(path)


def serve_config(args: argparse.Namespace) -> Config:
    """conf.yaml with ``serve``'s options applied (``--http-port 0``: no HTTP port)."""
    data = _config(args).model_dump()
    if args.ae_title is not None:
        data["node"]["ae_title"] = args.ae_title
    if args.port is not None:
        data["node"]["port"] = args.port
    if args.http_port is not None:
        data["node"]["http_port"] = args.http_port
    if args.spool is not None:
        data["spool"]["directory"] = args.spool.resolve()
    data["destinations"] += [parse_ae_address(a).model_dump() for a in args.send_to]
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.service import Service

    config = serve_config(args)
    service = Service(config)
    service.start()
    pid_file = config.spool.directory / PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: draining and stopping", signum)
        service.stop()

    def reload(signum: int, frame: FrameType | None) -> None:
        log.info("SIGHUP: reloading the bundles")
        # Off the signal handler: loading takes seconds, and the handler must return.
        threading.Thread(target=service.reload, name="orthonode-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    try:
        service.wait()
    finally:
        pid_file.unlink(missing_ok=True)
    return 0


def _reload(args: argparse.Namespace) -> int:
    pid_file = _config(args).spool.directory / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as error:
        sys.stderr.write(
            f"reload: no running node found through {pid_file} ({error}); is it serving "
            "with this configuration?\n"
        )
        return 1
    sys.stdout.write(
        f"sent SIGHUP to the node (pid {pid}): it verifies and loads the bundles between "
        "batches; its log and audit trail say whether they were taken (reload) or refused "
        "(reload-refused)\n"
    )
    return 0


def _echo(args: argparse.Namespace) -> int:
    from dicom_node.status.verify import echo

    target = parse_ae_address(args.address)
    assert target.host is not None and target.ae_title is not None  # AE@host:port gives both
    result = echo(
        target.host, target.port, target.ae_title, args.calling_ae, timeout_s=args.timeout
    )
    if not result.ok:
        sys.stderr.write(f"echo: {result.text}\n")
        return 1
    sys.stdout.write(f"{result.text}\n")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from dicom_node.applicability import load_image_checker
    from dicom_node.models.bundle import load_bundles

    config = _config(args)
    if config.node.tls is not None:
        server_context(config.node.tls)  # the certificate and key load, or ConfigError
    if config.http.tls is not None:
        server_context(config.http.tls)  # HTTPS: the same certificate checks
    if config.http.tokens_file is not None:
        from dicom_node.http import Tokens

        try:
            Tokens(config.http.tokens_file)
        except OSError as error:
            raise ConfigError(str(error)) from None
    for destination in config.destinations:
        if destination.tls is not None:
            client_context(destination.tls, f"destination {destination.key}")
        if destination.type == "dicomweb":
            from dicom_node.send.stow import CredentialError, credentials

            try:
                credentials(destination)
            except CredentialError as error:
                raise ConfigError(f"destination {destination.key}: {error}") from None
    tls = " (DICOM TLS)" if config.node.tls is not None else ""
    sys.stdout.write(
        f"configuration OK: AE title {config.node.ae_title}, port {config.node.port}{tls}, "
        f"{len(config.peers) or 'any'} peer(s), {len(config.destinations)} destination(s), "
        f"spool {config.spool.directory}\n"
    )
    bundles = load_bundles(config)
    for task, bundle in bundles.items():
        card = bundle.card
        details = [card.backbone, f"{card.input_size} px"]
        if card.roi is not None:
            details.append("region of interest")
        if card.decision_threshold is not None:
            details.append(f"operating point {card.decision_threshold:.3f}")
        if card.ood is not None:
            details.append(f"out-of-distribution threshold {card.ood.threshold:.1f}")
        sys.stdout.write(
            f"  {task}: {card.name} {card.version} ({', '.join(details)})"
            f"{' DEMO WEIGHTS - not for clinical use' if card.demo else ''}\n"
        )
    if config.routing.image_check == "off":
        sys.stdout.write("  image check: off (tags alone decide the route)\n")
    else:
        checker = load_image_checker(config.routing.image_check_bundle)
        thresholds = ", ".join(
            f"{t} {v:.2f}" for t, v in sorted(checker.card.implant_thresholds.items())
        )
        sys.stdout.write(
            f"  image check ({config.routing.image_check}): {checker.card.name} "
            f"{checker.card.version} ({checker.card.input_size} px; implant thresholds "
            f"{thresholds}){' DEMO WEIGHTS - not for clinical use' if checker.card.demo else ''}\n"
        )
    return 0


def _readyz(config: Config, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The running node's ``/readyz`` answer (on this host), or None when it does not answer."""
    port = config.node.http_port
    if not port or config.http.tls is not None:
        return None
    host = config.node.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return dict(json.loads(answer.read()))
    except urllib.error.HTTPError as error:  # 503: not ready, and it says why
        try:
            return dict(json.loads(error.read()))
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def _status(args: argparse.Namespace) -> int:
    from dicom_node.status.health import Health, assess
    from dicom_node.status.model import StatusModel
    from dicom_node.status.text import status_lines
    from dicom_node.store import Spool

    config = _config(args)
    if args.spool is not None or args.http_port is not None:
        # The node started with serve's --spool / --http-port: read that spool, ask that port.
        data = config.model_dump()
        if args.spool is not None:
            data["spool"]["directory"] = args.spool.resolve()
        if args.http_port is not None:
            data["node"]["http_port"] = args.http_port
        config = Config.model_validate(data)
    if args.task and args.task not in config.tasks:
        raise ConfigError(
            f"--task {args.task}: not a task of the configuration ({', '.join(config.tasks)})"
        )
    spool = Spool(config.spool.directory)
    try:
        model = StatusModel(spool, config)
        answer = _readyz(config)
        if answer is not None:
            checks = {
                name: [] if found == "ok" else list(found)
                for name, found in dict(answer.get("checks", {})).items()
            }
            health: Health = assess(checks, list(answer.get("warnings", [])))
            where = f"the node answers on port {config.node.http_port}"
        else:
            health = assess({}, model.warnings())
            where = "the node does not answer on its HTTP port: health from the spool alone"
        lines = status_lines(
            model,
            health,
            node_answer=where,
            state=args.state or "",
            task=args.task or "",
            limit=args.limit,
            problems=args.problems,
        )
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        spool.close()
    return 0


def _send(args: argparse.Namespace) -> int:
    from dicom_node.store import Spool

    if not args.retry_dead:
        sys.stderr.write("send: nothing to do; use --retry-dead\n")
        return 2
    config = _config(args)
    spool = Spool(config.spool.directory)
    audit = open_audit(config)
    try:
        count = spool.retry_dead()
        audit.record("replay", count=count)
    finally:
        spool.close()
        audit.close()
    sys.stdout.write(f"{count} dead letter(s) queued again\n")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from dicom_node.store import Spool

    config = _config(args)
    spool = Spool(config.spool.directory)  # opening it applies what its index lacks
    try:
        before, after = spool.opened_at_version, spool.schema_version()
    finally:
        spool.close()
    done = "up to date" if before == after else "migrated"
    sys.stdout.write(
        f"spool {config.spool.directory}: schema version {before} -> {after} ({done})\n"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node",
        description=("orthonode DICOM node. Demo weights are not for clinical use."),
    )
    parser.add_argument("--log-level", default=os.environ.get("ORTHONODE_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("ORTHONODE_LOG_FORMAT", "text"),
        help="json: one object per line with UIDs and stage (dicom_node/logs.py)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="conf.yaml (default: ./conf.yaml if present, else built-in defaults)",
        )
        return p

    serve = with_config(sub.add_parser("serve", help="receive, analyse and send back"))
    serve.add_argument("--ae-title", default=None)
    serve.add_argument("--port", type=int, default=None, help="DICOM port (node.port)")
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="status page, STOW-RS and metrics port (node.http_port); 0: none",
    )
    serve.add_argument("--spool", type=Path, default=None)
    serve.add_argument("--send-to", action="append", default=[], metavar="AE@HOST:PORT")
    serve.set_defaults(run=_serve)
    echo = sub.add_parser("echo", help="C-ECHO a DICOM node")
    echo.add_argument("address", metavar="AE@HOST:PORT")
    echo.add_argument("--calling-ae", default="ORTHONODE")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.set_defaults(run=_echo)
    with_config(
        sub.add_parser("check-config", help="validate conf.yaml and the bundles")
    ).set_defaults(run=_check_config)
    status = with_config(
        sub.add_parser(
            "status",
            help="health, queues, recent studies, problems and dead letters (as the status page)",
        )
    )
    status.add_argument(
        "--state",
        choices=STUDY_FILTER_STATES,
        default=None,
        help="only studies in this state",
    )
    status.add_argument("--task", default=None, help="only studies of this task")
    status.add_argument(
        "--spool", type=Path, default=None, help="the spool of a node started with serve --spool"
    )
    status.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="the HTTP port of a node started with serve --http-port (for its health)",
    )
    status.add_argument("--limit", type=int, default=20, help="studies listed (default 20)")
    status.add_argument(
        "--problems", type=int, default=10, help="problems listed, newest first (default 10)"
    )
    status.set_defaults(run=_status)
    send = with_config(sub.add_parser("send", help="outbound queue maintenance"))
    send.add_argument("--retry-dead", action="store_true")
    send.set_defaults(run=_send)
    with_config(
        sub.add_parser("reload", help="load changed bundles into the running node (SIGHUP)")
    ).set_defaults(run=_reload)
    with_config(
        sub.add_parser(
            "migrate", help="bring the spool's index to this release's schema (idempotent)"
        )
    ).set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs(args.log_level, args.log_format)
    for chatty in ("highdicom", "pynetdicom", "openjpeg"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.run(args))
    except DicomNodeError as error:
        sys.stderr.write(f"{args.command}: {error}\n")
        return 2
