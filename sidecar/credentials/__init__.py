"""Credentials: what the sidecar injects for a client, and how it gets it.

A provider (``base.CredentialProvider``) answers "the credential of this caller
for this upstream"; the injection rule (``sidecar/inject.py``) says where it goes.
``static.StaticKey`` is ``api_key``, a key read from the secret store;
``oauth`` holds the OAuth types, whose value is an access token.
``factory.build_provider`` builds the one an upstream's ``credential.type`` names.
"""
