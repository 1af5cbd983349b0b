"""FHIR–DICOMweb bridge: DICOMweb studies published as FHIR R4 ImagingStudy resources."""

__version__ = "0.1.0"
