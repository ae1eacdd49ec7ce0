"""PACS push: a DICOM listener that stores every instance durably before answering Success."""
