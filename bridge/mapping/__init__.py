"""How a DICOM study becomes FHIR resources: pure functions from records to R4 JSON. No I/O."""
