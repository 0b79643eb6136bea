"""Synthetic radiograph phantoms (knee, hip, spine) written as DICOM with a manifest and masks.

Entry points: :func:`train.synth.generate.generate` and ``python -m train synth``.
"""
