"""``python -m train export``: copy a trained bundle to where the node reads it.

A ``fit`` output folder also holds the report, split and metrics; the node needs only
``model.pt``, ``localiser.pt`` (when the card names one) and ``card.json``. Export verifies the
sha256 of every weight file, copies those files, optionally sets the version and name (a new
version gets a new Device UID, since the SR's observer must change when the model does), loads
the result as the node would, and prints the conf.yaml lines that use it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from dicom_node.errors import BundleError
from dicom_node.models.bundle import device_uid, load_bundle, update_card
from train.cli import run_command

__all__ = ["export", "get_args_parser", "main"]


def export(
    source: Path, destination: Path, *, version: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """Copy the node's files of the bundle at ``source`` to ``destination``; verify both."""
    bundle = load_bundle(source)  # refuses a bundle whose sha256 does not match
    if destination.resolve() == source.resolve():
        raise ValueError("--out must be another folder than --bundle")
    destination.mkdir(parents=True, exist_ok=True)
    files = ["model.pt", "card.json"]
    if bundle.card.roi is not None:
        files.append(bundle.card.roi.file)
    for stale in ("model.pt", "localiser.pt", "card.json"):
        (destination / stale).unlink(missing_ok=True)
    for file in files:
        shutil.copy2(source / file, destination / file)
    changes: dict[str, Any] = {}
    if name:
        changes["name"] = name
    if version and version != bundle.card.version:
        changes["version"] = version
        changes["device_uid"] = device_uid(bundle.card.task, version, bundle.card.model_sha256)
    if changes:
        update_card(destination, changes)
    exported = load_bundle(destination)
    return {
        "task": exported.card.task,
        "version": exported.card.version,
        "device_uid": exported.card.device_uid,
        "files": files,
        "bytes": sum((destination / f).stat().st_size for f in files),
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train export",
        add_help=add_help,
        description="Copy a trained bundle (fit's output) to the folder the node reads.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="fit's --out folder")
    parser.add_argument("--out", type=Path, required=True, help="e.g. weights/knee")
    parser.add_argument("--version", default=None, help="set a new version (new Device UID)")
    parser.add_argument("--name", default=None, help="set the algorithm's name")
    return parser


def main(args: argparse.Namespace) -> int:
    def show(result: dict[str, Any]) -> None:
        sys.stdout.write(
            f"exported {result['task']} {result['version']} ({result['bytes']} bytes) to "
            f"{args.out}\n"
            f"conf.yaml:\n  tasks:\n    {result['task']}:\n      bundle: {args.out}\n"
        )

    return run_command(
        "export",
        lambda: export(args.bundle, args.out, version=args.version, name=args.name),
        show,
        errors=(OSError, ValueError, BundleError),  # other node errors are bugs here
    )
