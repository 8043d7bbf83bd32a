"""Serves a directory of downloaded wheels to an image build as a PEP 503 index on 127.0.0.1.

    python3 docker/wheelhouse.py DIR PORT_FILE    # index at http://127.0.0.1:<port>/simple, the port in PORT_FILE

docker/build.sh --host-pip fills DIR with this machine's pip (`pip download`: its indexes, find-links, proxy and
certificate settings, which a build container does not have) and points the build's PIP_INDEX_URL and TORCH_INDEX
here, so the build reaches nothing but loopback. pip trusts plain HTTP on 127.0.0.0/8. Runs until killed.
"""

from __future__ import annotations

import functools
import http.server
import re
import sys
from pathlib import Path


def project_of(filename: str) -> str:
    """The normalised project name of a wheel or sdist file name (PEP 427 / PEP 625, PEP 503)."""
    if filename.endswith(".whl"):
        name = filename.split("-", 1)[0]
    else:
        name = re.sub(r"\.(tar\.gz|zip)$", "", filename).rsplit("-", 1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def make_index(wheels: Path) -> Path:
    """wheels/simple/<project>/<file>, links to the files: the layout pip asks an index for."""
    simple = wheels / "simple"
    for path in sorted(wheels.iterdir()):
        if path.is_file() and path.name.endswith((".whl", ".tar.gz", ".zip")):
            project = simple / project_of(path.name)
            project.mkdir(parents=True, exist_ok=True)
            link = project / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return simple


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per file would drown the build's log
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    wheels, port_file = Path(argv[0]), Path(argv[1])
    make_index(wheels)
    handler = functools.partial(QuietHandler, directory=str(wheels))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
