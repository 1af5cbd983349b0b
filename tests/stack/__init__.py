"""Real peers (Orthanc, a FHIR server) and sample data for the test suite."""
