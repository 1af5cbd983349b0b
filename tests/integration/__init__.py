"""Integration tests against the real Orthanc, FHIR server and databases."""
