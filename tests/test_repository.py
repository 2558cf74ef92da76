"""The repository itself: what every tracked file must satisfy.

The failure guarded against: a merge left `<<<<<<<` / `>>>>>>>` conflict lines in docs/ADMIN.md, which no
other test reads, so the docs promised two contradictory access tables at once.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFLICT_LINE = re.compile(rb"^(<{7}|>{7})( |$)|^={7}$", re.M)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (a source archive): nothing to list")
    return [REPO / name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_holds_merge_conflict_lines() -> None:
    conflicted = []
    for path in tracked_files():
        try:
            text = path.read_bytes()
        except OSError:
            continue  # listed but deleted in the working tree
        if CONFLICT_LINE.search(text):
            conflicted.append(str(path.relative_to(REPO)))
    assert not conflicted, f"merge conflict lines in {conflicted}"
