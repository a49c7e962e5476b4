"""Download TIFA v1.0's question/answer file for the user, verified against the upstream repository.

    python -m evalkit.tifa_questions [--out datasets/tifa_v1/tifa_v1.0_question_answers.json]

The file is fetched from `Yushi-Hu/tifa` at the commit our text inputs come from, and kept only if its git blob hash
equals the one that commit records, so a changed or truncated download never reaches the scorer.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path

from evalkit.errors import DatasetError
from evalkit.paths import PROJECT_ROOT
from evalkit.store import atomic_write_bytes

COMMIT = "8e37050f44ab4ee681e4251f3c8a9d4cc86e901e"
URL = f"https://raw.githubusercontent.com/Yushi-Hu/tifa/{COMMIT}/tifa_v1.0/tifa_v1.0_question_answers.json"
GIT_BLOB = "6a563f9c157e5b2a24b9f4936edd3934a8a70add"  # `git ls-tree HEAD tifa_v1.0/` at COMMIT
DEFAULT_OUT = PROJECT_ROOT / "datasets" / "tifa_v1" / "tifa_v1.0_question_answers.json"
DOWNLOAD_COMMAND = "python -m evalkit.tifa_questions"


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(out: Path = DEFAULT_OUT, url: str = URL, expected_blob: str = GIT_BLOB) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
    except OSError as error:
        raise DatasetError(f"cannot download the TIFA questions from {url} ({error}); fetch it on a machine with "
                           f"network and put it at {out}") from None
    if git_blob_sha1(data) != expected_blob:
        raise DatasetError(f"the file from {url} is not the upstream one (git blob {git_blob_sha1(data)[:12]}, "
                           f"expected {expected_blob[:12]}); nothing was written")
    atomic_write_bytes(out, data)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=DOWNLOAD_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        print(f"TIFA v1.0 questions -> {download(args.out)}")
    except DatasetError as error:
        print(f"evalkit: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
