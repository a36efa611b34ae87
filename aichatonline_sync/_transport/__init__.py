"""The transport layer: the one room where requests, urllib3 and http.client internals are used.

``transport`` sends one request through ``requests.Session``'s public API, reads the body in raw
blocks and maps every foreign exception to ours; ``cancel`` is the deadline and abort that its
reads observe. Only ``transport`` may touch private names of other libraries
(tests/test_architecture.py).
"""
