"""orthonode training tools: phantom generation, training, evaluation and bundle export.

``python -m train synth`` writes synthetic radiograph phantoms; see docs/phantoms.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
