"""Offline check: no minimum version that setup.cfg allows is known to be vulnerable.

pip-audit needs the PyPI JSON API or OSV, which CI machines here cannot reach; this table lists the
advisories that concern our runtime dependencies (checked by hand against the GitHub advisory
database), and the check fails when the smallest version our pins admit is affected. Keep it current
when an advisory appears; pip-audit runs as well whenever its service is reachable.
"""

from __future__ import annotations

import configparser
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# name -> list of (advisory, affected range, why it does not apply to us or None)
OWN_DECODER = (
    "our read loop decodes gzip/deflate itself, in bounded steps (aichatonline_sync._transport), "
    "and never asks urllib3 to decode a streamed body on a real connection"
)
NO_REDIRECTS = "every request is sent with allow_redirects=False: urllib3 never follows or drains one"
ADVISORIES: dict[str, list[tuple[str, str, str | None]]] = {
    "requests": [
        ("CVE-2023-32681 Proxy-Authorization leak on redirect", "<2.31.0", None),
        ("CVE-2024-35195 verify=False sticks to the connection", "<2.32.0", None),
        ("CVE-2024-47081 .netrc credentials leak", "<2.32.4", None),
    ],
    "urllib3": [
        ("CVE-2023-43804 Cookie header kept on cross-origin redirect", "<1.26.17", None),
        ("CVE-2023-45803 body kept on 303 redirect", "<1.26.18", None),
        ("CVE-2024-37891 Proxy-Authorization kept on cross-origin redirect", "<1.26.19", None),
        ("CVE-2024-37891 (2.x)", ">=2.0.0,<2.2.2", None),
        ("CVE-2025-50181 redirects not disabled by PoolManager retries", "<2.5.0", NO_REDIRECTS),
        ("CVE-2025-66418 unbounded decompression chain", "<2.6.0", OWN_DECODER),
        ("CVE-2025-66471 streaming API decompresses too much", "<2.6.0", OWN_DECODER),
        ("CVE-2026-21441 decompression on redirect drain", "<2.6.3", NO_REDIRECTS),
        ("CVE-2026-44432 brotli / drain_conn decompress whole body", "<2.7.0", OWN_DECODER),
    ],
    "tenacity": [],
}

# Versions that exist, in order, to find every one a specifier admits.
CANDIDATES = {
    "requests": ["2.31.0", "2.32.0", "2.32.3", "2.32.4", "2.32.5", "2.33.0", "2.34.0", "2.34.2"],
    "urllib3": ["1.26.17", "1.26.18", "1.26.19", "1.26.20", "2.0.0", "2.2.2", "2.5.0", "2.6.0",
                "2.6.3", "2.7.0", "2.8.0"],
    "tenacity": ["8.2.0", "8.3.0", "9.0.0", "9.2.1"],
}


def main() -> int:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    failed = False
    for line in lines:
        req = Requirement(line)
        name = req.name.lower()
        allowed = [v for v in CANDIDATES.get(name, []) if Version(v) in req.specifier]
        for version in allowed:
            for advisory, affected, not_applicable in ADVISORIES.get(name, []):
                if Version(version) not in SpecifierSet(affected):
                    continue
                if not_applicable:
                    print(f"note: {name} {version}: {advisory}: not applicable: {not_applicable}")
                else:
                    print(f"VULNERABLE: {line!r} admits {name} {version}: {advisory}")
                    failed = True
        print(f"{line}: {'checked ' + ', '.join(allowed) if allowed else 'no candidates listed'}")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        for advisory, affected, not_applicable in ADVISORIES.get(name, []):
            if Version(installed) in SpecifierSet(affected) and not not_applicable:
                print(f"VULNERABLE: installed {name} {installed}: {advisory}")
                failed = True
        print(f"installed {name} {installed}: checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
