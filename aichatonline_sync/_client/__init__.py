"""The client layer: the public ``Session`` and what it is made of.

Options (``config``, ``env``), the retry loop (``retry``), the token (``token``), the stream
(``stream``), the session (``session``), the sessions shared by module-level calls (``registry``,
``api``), batches (``batch``), and the per-chat extras: cache, usage, hooks, events, tracing.
``batch`` is here and not among the features because ``Session.batch`` is part of the client's API.
"""
