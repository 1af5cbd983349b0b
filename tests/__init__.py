"""Tests of the FHIR–DICOMweb bridge."""
