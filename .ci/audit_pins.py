"""Advisory report, offline: which published advisories on our runtime dependencies touch a code path
of ours, and why the others do not apply, for the versions setup.cfg admits and those installed.

The pins are as wide as the code really works with (each floor is a row of .ci/run's matrix), not
narrowed to dodge advisories: requests itself leaves security upgrades of shared dependencies to
the application, and docs/install.rst recommends the newest releases. So an advisory is reported,
and fails nothing by itself. The check fails (exit 1) only when

- an advisory that touches our code affects an *installed* version (CI installs the newest
  releases, our recommendation: then the recommendation itself is not safe), or
- an advisory has no verdict, or setup.cfg names a runtime dependency that this table does not.

The table was checked by hand against the GitHub advisory database; keep it current when an
advisory appears. pip-audit runs before this in .ci/run whenever its service answers.
"""

from __future__ import annotations

import configparser
import sys
from importlib import metadata
from pathlib import Path
from typing import NamedTuple, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# --- our code paths that an advisory may touch ---------------------------------------------------

READ = (
    "reply bodies are read by our own loop (_transport: http.client's buffered reader, de-chunked "
    "by _framing) and decoded by _framing in bounded steps, gzip or deflate once, any other or "
    "stacked Content-Encoding refused; urllib3 decodes nothing there"
)
FALLBACK = (
    "the public fallback (_transport._public_reads: urllib3's read1/stream with "
    "decode_content=False, decoded by _framing in the same bounded steps) runs only when a reply is not urllib3's over http.client: an adapter of "
    "yours (mocking, caching) mounted on the requests.Session you pass as http="
)
NO_REDIRECTS = (
    "every request is sent with allow_redirects=False: requests follows no redirect, and urllib3 "
    "is called with redirect=False, so no redirect is followed, rebuilt or drained"
)
OWN_URLS = (
    "the only URLs parsed are base_url plus fixed paths and the proxy URL, the caller's own "
    "settings; no URL from a reply is ever parsed (no redirects)"
)
GIVEN_SESSION = "only with Session(http=your requests.Session), whose settings are yours"


class Advisory(NamedTuple):
    package: str
    ident: str
    summary: str
    affected: tuple[str, ...]  # specifier sets, any of which
    fixed: str
    applies: Optional[str]  # the code path it touches, and when; None: it does not apply
    why_not: Optional[str] = None  # why it does not apply


ADVISORIES = [
    Advisory("requests", "CVE-2023-32681", "Proxy-Authorization sent on to the destination of an "
             "HTTPS redirect", (">=2.3.0,<2.31.0",), "2.31.0", None, NO_REDIRECTS),
    Advisory("requests", "CVE-2024-35195", "a Session whose first request to a host had "
             "verify=False keeps skipping verification on that host's pooled connections",
             ("<2.32.0",), "2.32.0",
             f"{GIVEN_SESSION}, when that session also sends verify=False requests to the same "
             "host; a session we make has one verify setting for all its requests", None),
    Advisory("requests", "CVE-2024-47081", ".netrc credentials sent for a crafted URL",
             ("<2.32.4",), "2.32.4", None,
             "our own sessions set trust_env=False and never read .netrc; and " + OWN_URLS),
    Advisory("requests", "CVE-2026-25645", "extract_zipped_paths() reuses a predictable temporary "
             "file", ("<2.33.0",), "2.33.0",
             "TLS verification (verify=True) when requests and certifi are imported from a zip "
             "archive (zipapp, pex): the CA bundle is then extracted to a temporary path; an "
             "ordinary install extracts nothing", None),
    Advisory("urllib3", "CVE-2021-33503", "catastrophic backtracking on a URL authority with many "
             "'@'", ("<1.26.5",), "1.26.5", None, OWN_URLS),
    Advisory("urllib3", "CVE-2023-43804", "Cookie header kept on a cross-origin redirect",
             ("<1.26.17", ">=2.0.0,<2.0.6"), "1.26.17, 2.0.6", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2023-45803", "request body kept on a 303 redirect",
             ("<1.26.18", ">=2.0.0,<2.0.7"), "1.26.18, 2.0.7", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2024-37891", "Proxy-Authorization kept on a cross-origin redirect",
             ("<1.26.19", ">=2.0.0,<2.2.2"), "1.26.19, 2.2.2", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2025-50181", "redirects not disabled by PoolManager(retries=...)",
             ("<2.5.0",), "2.5.0", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2025-50182", "redirect settings ignored under Pyodide",
             (">=2.2.0,<2.5.0",), "2.5.0", None,
             "we run on CPython with threads and sockets, never under Pyodide"),
    Advisory("urllib3", "CVE-2025-66418", "unbounded chain of Content-Encodings",
             (">=1.24,<2.6.0",), "2.6.0",
             f"{FALLBACK}; not the main read path: {READ}", None),
    Advisory("urllib3", "CVE-2025-66471", "the streaming API decompresses far more than asked",
             (">=1.0,<2.6.0",), "2.6.0",
             f"{FALLBACK}; not the main read path: {READ}", None),
    Advisory("urllib3", "CVE-2026-21441", "a redirect's body decompressed whole while draining it",
             (">=1.22,<2.6.3",), "2.6.3", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2026-44431", "sensitive headers forwarded on cross-origin redirects",
             ("<2.7.0",), "2.7.0", None, NO_REDIRECTS),
    Advisory("urllib3", "CVE-2026-44432", "Brotli bodies (second read(amt)) or drain_conn() after "
             "a partial read decompressed whole", (">=2.6.0,<2.7.0",), "2.7.0",
             f"{FALLBACK}, with a brotli package installed and a server sending br unasked (we ask "
             f"for gzip and deflate only); we never call drain_conn(); not the main read path: "
             f"{READ}", None),
]

# Releases on PyPI from each floor on (yanked ones left out), to name the admitted ones affected.
RELEASES = {
    "requests": "2.25.0 2.25.1 2.26.0 2.27.0 2.27.1 2.28.0 2.28.1 2.28.2 2.29.0 2.30.0 2.31.0 "
                "2.32.2 2.32.3 2.32.4 2.32.5 2.33.0 2.33.1 2.34.0 2.34.1 2.34.2",
    "urllib3": " ".join(f"1.26.{n}" for n in range(21))
               + " 2.0.2 2.0.3 2.0.4 2.0.5 2.0.6 2.0.7 2.1.0 2.2.0 2.2.1 2.2.2 2.2.3 2.3.0 2.4.0 "
                 "2.5.0 2.6.0 2.6.1 2.6.2 2.6.3 2.7.0 2.8.0",
    "tenacity": "8.3.0 8.4.0 8.4.1 8.4.2 8.5.0 9.0.0 9.1.2 9.1.3 9.1.4 9.2.1",
}


def affects(advisory: Advisory, version: str) -> bool:
    return any(Version(version) in SpecifierSet(spec) for spec in advisory.affected)


def span(versions: list[str]) -> str:
    if not versions:
        return "none"
    return versions[0] if len(versions) == 1 else f"{versions[0]} to {versions[-1]}"


def report(line: str) -> list[str]:
    """Print the report of one requirement line; return the problems that fail the check."""
    req = Requirement(line)
    name = req.name.lower()
    problems: list[str] = []
    if name not in RELEASES:
        return [f"{name}: no table of releases and advisories here (.ci/audit_pins.py)"]
    try:
        installed: Optional[str] = metadata.version(name)
    except metadata.PackageNotFoundError:
        installed = None
    known = RELEASES[name].split()
    if installed and installed not in known:
        known.append(installed)
    admitted = sorted((v for v in known if Version(v) in req.specifier), key=Version)
    print(f"{line}: admits {span(admitted)} of the releases listed; installed {installed}")
    for advisory in (a for a in ADVISORIES if a.package == name):
        hit = [v for v in admitted if affects(advisory, v)]
        if advisory.applies is None and not advisory.why_not:
            problems.append(f"{advisory.ident}: no verdict")
        head = f"  {advisory.ident} ({advisory.summary}; fixed in {advisory.fixed})"
        where = f"affects admitted {span(hit)}" if hit else "affects no admitted release"
        if advisory.applies:
            print(f"{head}: {where}. TOUCHES our code: {advisory.applies}.")
            if installed and affects(advisory, installed):
                problems.append(f"installed {name} {installed} has {advisory.ident}, which "
                                "touches our code: upgrade it")
        else:
            print(f"{head}: {where}. Does not apply: {advisory.why_not}.")
    if not any(a.package == name for a in ADVISORIES):
        print("  no advisories known")
    return problems


def main() -> int:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    lines = [x.strip() for x in cfg["options"]["install_requires"].splitlines() if x.strip()]
    problems = [problem for line in lines for problem in report(line)]
    touching = sum(1 for a in ADVISORIES if a.applies)
    print(f"{len(ADVISORIES)} advisories: {touching} touch our code in some setting (see above), "
          f"{len(ADVISORIES) - touching} do not apply; docs/install.rst recommends the newest releases.")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
