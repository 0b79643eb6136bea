"""``python -m train synth``: the command line of the phantom generator (:mod:`.generate`)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from train.synth.generate import (
    EXTERNAL,
    IMPLANTS,
    TASKS,
    SynthOptions,
    generate,
)

__all__ = ["get_args_parser", "main", "options_from_args"]


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"size {text!r}: use N or ROWSxCOLS, e.g. 1024 or 3000x2500")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train synth",
        add_help=add_help,
        description="Write synthetic knee, hip or spine radiograph phantoms as DICOM, with "
        "masks and a manifest.csv, with or without the task's implant, or of other anatomy "
        "(--task other). Phantoms are not a substitute for clinical data.",
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        type=_size,
        default=(1024, 1024),
        help="matrix: N or ROWSxCOLS (128..4096; default 1024)",
    )
    parser.add_argument(
        "--acquisition",
        choices=["default", "external"],
        default="default",
        help="'external' shifts every acquisition option below to another "
        "hospital's technique unless given explicitly",
    )
    parser.add_argument(
        "--modality",
        choices=["DX", "CR"],
        default=None,
        help="DX (Digital X-Ray For Presentation, default) or CR",
    )
    parser.add_argument(
        "--transfer-syntax",
        choices=["explicit", "jpeg2000"],
        default=None,
        help="Explicit VR Little Endian (default) or JPEG 2000 lossless",
    )
    parser.add_argument(
        "--photometric", choices=["MONOCHROME2", "MONOCHROME1", "mixed"], default=None
    )
    parser.add_argument(
        "--bits-stored",
        type=int,
        choices=[10, 12, 14, 15, 16],
        default=None,
        help="default: 12, 14 or 16 drawn per patient",
    )
    parser.add_argument("--noise", type=float, default=None, help="quantum-noise multiplier")
    parser.add_argument("--contrast", type=float, default=None, help="tone-curve gain")
    parser.add_argument(
        "--exposure",
        type=float,
        nargs=2,
        default=(0.6, 1.6),
        metavar=("LOW", "HIGH"),
        help="relative dose range",
    )
    parser.add_argument(
        "--spacing-scale",
        type=float,
        default=None,
        help="detector pixel pitch multiplier (field of view grows with it)",
    )
    parser.add_argument(
        "--rotation",
        type=float,
        default=None,
        help="in-plane rotation range, degrees (default ±15)",
    )
    parser.add_argument(
        "--views",
        default=None,
        help="comma-separated views (hip: AP or AP,LAT; default the task's)",
    )
    parser.add_argument(
        "--loose-fraction", type=float, default=0.5, help="hip: share of loose implants"
    )
    parser.add_argument(
        "--lucency-free-fraction",
        type=float,
        default=None,
        help="hip: share of loose implants shown by subsidence and/or osteolysis only, "
        "without a lucent line (default: the natural mix, about 8 %%)",
    )
    parser.add_argument(
        "--implant",
        choices=IMPLANTS,
        default="present",
        help="present: the task's implant (default); none: native anatomy, no hardware; "
        "other: other hardware, not the task's implant; cut: the implant outside the field "
        "(at most 5 %% of it visible); mixed: per patient 40 %% present, 20 %% none, "
        "25 %% other, 15 %% cut. Masks are empty except for present (and what cut shows)",
    )
    parser.add_argument(
        "--tags-as",
        choices=sorted(TASKS),
        default=None,
        help="write this task's BodyPartExamined and descriptions (other: a chest's); the "
        "manifest keeps the true task and anatomy",
    )
    parser.add_argument(
        "--no-tags",
        action="store_true",
        help="omit BodyPartExamined, ViewPosition and every tag that names the body part or view",
    )
    parser.add_argument(
        "--first-patient", type=int, default=0, help="index of the first patient (to extend a set)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (output is identical for any number)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def options_from_args(args: argparse.Namespace) -> SynthOptions:
    preset = EXTERNAL if args.acquisition == "external" else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    options = SynthOptions(
        task=args.task,
        patients=args.patients,
        out=args.out,
        seed=args.seed,
        rows=args.size[0],
        cols=args.size[1],
        modality=pick("modality", "DX"),
        transfer_syntax=pick("transfer_syntax", "explicit"),
        photometric=pick("photometric", "MONOCHROME2"),
        bits_stored=args.bits_stored,
        noise=pick("noise", 1.0),
        contrast=pick("contrast", 1.0),
        exposure=tuple(args.exposure),
        spacing_scale=pick("spacing_scale", 1.0),
        rotation=pick("rotation", 15.0),
        views=tuple(v.strip().upper() for v in args.views.split(",")) if args.views else None,
        loose_fraction=args.loose_fraction,
        lucency_free_fraction=args.lucency_free_fraction,
        first_patient=args.first_patient,
        workers=max(1, args.workers or os.cpu_count() or 1),
        implant=args.implant,
        tags_as=args.tags_as,
        no_tags=args.no_tags,
    )
    return replace(options, extra={"acquisition": args.acquisition})


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    try:
        generate(options, progress=not args.quiet)
    except ValueError as error:
        sys.stderr.write(f"synth: {error}\n")
        return 2
    return 0
