"""The sink side: an async FHIR R4 REST client."""
