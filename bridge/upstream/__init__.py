"""Talking to the upstreams (the DICOMweb archives, the FHIR server, token endpoints): one file per job.

- ``client``: one upstream's settings built into an ``httpx.AsyncClient`` (the one factory) and
  its retry policy.
- ``credentials``: outgoing auth (basic, bearer, OAuth2 client credentials, SMART backend).
- ``tls``: the TLS context (CA bundle, client certificates) and the check of its files.
- ``retry``: the one retry policy and ``send``, which every call goes through.
- ``breaker``: a circuit breaker per upstream.
- ``errors``: httpx outcomes mapped to bridge errors, once.
- ``bounds``: deadline, stall, pace and size caps of one answer (``send_bounded``).
- ``jsonstream``: the streaming JSON parser for large answers.

Import from the module that does the job; this file re-exports nothing, so importing one job does
not load the others.
"""
