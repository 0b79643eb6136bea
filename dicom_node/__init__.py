"""orthonode DICOM node service."""
