"""Who is calling: request headers in, an Identity out.

- ``base``: what every mode shares (Identity, the IdentityResolver protocol, the
  header and client ID checks, the identity an app gives the proxy itself);
- ``header``: header mode, the client ID the MCP server forwards;
- ``jwt_bearer``: JWT mode, a bearer token whose signature the sidecar verifies;
- ``factory``: the one place that picks the mode from the settings.

Nothing is imported here: each name is imported from the module that defines it,
and importing the package does not load PyJWT and cryptography (only JWT mode
needs them).
"""
