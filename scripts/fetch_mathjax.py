"""Put MathJax beside the book, so a locally built book renders its formulas offline.

Sphinx loads MathJax from a CDN by default; read from disk without a network, the
pages then show raw LaTeX. This fetches MathJax 3 from the npm registry once (pinned
version and checksum) and keeps one self-contained file, ``tex-svg-full.js`` (every TeX
extension, fonts included), in ``_static/mathjax/``; ``_config.yml`` points Sphinx at
it. ``make setup`` runs this.

    python scripts/fetch_mathjax.py
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "3.2.2"
URL = f"https://registry.npmjs.org/mathjax/-/mathjax-{VERSION}.tgz"
SHA256 = "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09"
MEMBER = "package/es5/tex-svg-full.js"
TARGET = ROOT / "_static" / "mathjax" / "tex-svg-full.js"


def main() -> int:
    if TARGET.is_file():
        return 0
    with urllib.request.urlopen(URL, timeout=120) as response:
        archive = response.read()
    digest = hashlib.sha256(archive).hexdigest()
    if digest != SHA256:
        print(f"{URL}: sha256 {digest}, expected {SHA256}; not using it", file=sys.stderr)
        return 1
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        script = tar.extractfile(MEMBER).read()
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_bytes(script)
    print(f"MathJax {VERSION}: {TARGET.relative_to(ROOT)} ({len(script) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
