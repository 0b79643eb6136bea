"""``python -m dicom_node``: see :mod:`dicom_node.cli`."""

from dicom_node.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
