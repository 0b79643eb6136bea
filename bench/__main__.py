"""``python -m bench <benchmark> [options]``: run one benchmark by name."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bench <benchmark> [options]   (python -m bench <benchmark> --help)

  latency   end to end: storescu → the node (subprocess) → a real Orthanc; p50/p95 latency,
            throughput with studies in flight, the node's per-stage times
  ingest    C-STORE throughput with 1..K concurrent storescu senders: the node next to dcmtk's
            storescp (with and without fsync); MiB/s, instances/s and their ratio

Run as files: python bench/inference_speed.py, python bench/synth_speed.py
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "latency":
        from bench.latency import main as latency

        return latency(rest)
    if name == "ingest":
        from bench.ingest import main as ingest

        return ingest(rest)
    sys.stderr.write(f"unknown benchmark {name!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
