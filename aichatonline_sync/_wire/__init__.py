"""The wire layer: what the upstream's bytes mean, with no I/O.

The exceptions and their redaction (``errors``, ``redact``), the protocol's constants (``protocol``),
gpt4free's prompt format (``prompt``), the JSON-line parser (``parser``) and the HTTP body framings
(``framing``). Nothing here imports a layer above it or opens a socket.
"""
