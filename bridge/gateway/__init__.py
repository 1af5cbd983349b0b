"""The image gateway's own logic: which DICOMweb paths it serves, and forwarding them to an archive."""
