"""The source side: a QIDO-RS/WADO-RS client and the typed records it yields."""
