"""Load scenarios for the gateway, against a bare-aiohttp ceiling (see benchmarks/README.md).

``python -m benchmarks.run idle 1000`` · ``calls 32 10`` · ``ingest 10 5000 200`` ·
``cleanup`` · ``compare``. Each scenario prints one JSON line of figures; nothing
here asserts a time.
"""
