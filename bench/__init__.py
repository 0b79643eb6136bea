"""Benchmarks of orthonode; each writes its rows to BENCHMARKS.md with ``--write``.

``python -m bench latency`` runs the end-to-end latency benchmark (bench/latency.py). The older
scripts run as files: ``python bench/inference_speed.py``, ``python bench/synth_speed.py``.
"""
