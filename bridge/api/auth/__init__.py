"""Incoming authentication: who calls the API (key, bearer JWT, browser session) and what they may see.

``security`` checks API keys and JWTs; ``session`` keeps browser sessions; ``oidc`` talks to identity
providers and EHRs for browser login and SMART launch; ``access`` is the one rule of who sees which
patient; ``caller`` is the request's caller, worked out once, as the routes' dependency.
"""
