"""The upstream side: what an answer looks like, the pool limits, and the two clients that send.

``base`` holds what both clients share (the answer Protocols, the pool limits, the
hop-by-hop sets); ``fast`` is the lean client, ``aio`` the aiohttp pieces.
``sidecar.upstream`` picks one of them for each request.
"""
