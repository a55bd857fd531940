"""The data-plane listener: who reads a connection, and how its requests reach the pipeline.

- ``front``: owns the socket; hands each connection to the lean server, aiohttp's server
  or the CONNECT handler.
- ``fast``: the lean server (llhttp) for plain HTTP/1.1, and its ``FastExchange``.
- ``aio_server``: aiohttp's server, with the contract's answers for heads it cannot serve.
- ``aio_exchange``: ``AioExchange``, an aiohttp request as the pipeline's exchange.
- ``connect``: CONNECT: passthrough tunnels and interception.
"""
