"""``python -m dicom_node serve | echo | check-config | status | send --retry-dead | reload``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.audit import open_audit
from dicom_node.config import Config, load_config, parse_ae_address
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import configure as configure_logs
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


def _serve(args: argparse.Namespace) -> int:
    from dicom_node.service import Service

    data = _config(args).model_dump()
    if args.ae_title is not None:
        data["node"]["ae_title"] = args.ae_title
    if args.port is not None:
        data["node"]["port"] = args.port
    if args.spool is not None:
        data["spool"]["directory"] = args.spool.resolve()
    data["destinations"] += [parse_ae_address(a).model_dump() for a in args.send_to]
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
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
    target = parse_ae_address(args.address)
    assert target.host is not None and target.ae_title is not None  # AE@host:port gives both
    ae = AE(ae_title=args.calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer"
        sys.stderr.write(f"echo: {target.ae_title}@{target.host}:{target.port} {why}\n")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else -1
    if code != 0:
        sys.stderr.write(f"echo: C-ECHO status 0x{code:04X}\n")
        return 1
    sys.stdout.write(f"C-ECHO {target.ae_title}@{target.host}:{target.port}: success\n")
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


def _status(args: argparse.Namespace) -> int:
    from dicom_node.store import Spool

    spool = Spool(_config(args).spool.directory)
    try:
        lines = ["recent studies:"]
        for study in spool.recent_studies():
            lines.append(
                f"  {study.study_instance_uid} {study.task:5s} v{study.version} {study.state}"
                + (f" ({study.error})" if study.error else "")
            )
        counts = spool.outbox_counts()
        lines.append(
            "outbox: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("pending", "sent", "dead"))
        )
        for item in spool.dead_letters():
            lines.append(f"  dead: {item.path.name} -> {item.destination}: {item.last_error}")
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
    serve.add_argument("--port", type=int, default=None)
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
    with_config(sub.add_parser("status", help="recent studies, queues, dead letters")).set_defaults(
        run=_status
    )
    send = with_config(sub.add_parser("send", help="outbound queue maintenance"))
    send.add_argument("--retry-dead", action="store_true")
    send.set_defaults(run=_send)
    with_config(
        sub.add_parser("reload", help="load changed bundles into the running node (SIGHUP)")
    ).set_defaults(run=_reload)
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
