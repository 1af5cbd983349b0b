"""From an ImagingStudy (by id, reference, Study Instance UID or accession) to WADO-RS and viewer URLs."""
