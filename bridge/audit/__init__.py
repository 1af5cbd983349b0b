"""The access audit: who saw which patient's images, when, from where (AuditEvents, IHE BALP)."""
