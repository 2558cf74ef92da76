"""Top functions of a py-spy ``--format raw`` profile (collapsed stacks), as Markdown.

    python bench/pyspy_summary.py PROFILE.txt [--rate 100] [--duration 6] [--top 12]

Self time is where the samples' innermost frame was (the function itself running, or the C call it
made); "in" time counts a function whenever it is anywhere on the stack (once per sample), leaving out
the event loop's and the entry point's frames, which are on every stack. Functions are named without
line numbers, so one function's lines add up. Samples whose innermost frame is a wait (select, poll)
are counted apart; the rest / (rate x duration) is about the share of one core the process worked.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from itertools import zip_longest
from pathlib import Path

LINE = re.compile(r":\d+\)$")
# Leaf frames that mean the thread waits (py-spy's idle detection misses short waits): counted apart.
WAITING = re.compile(r"^(EpollSelector\.select|Poller\.poll|Condition\.wait|Event\.wait|select|poll) \(")
# Frames on nearly every stack that say nothing about where the time goes: left out of the "in" column.
PLUMBING = re.compile(r"\((asyncio/|<frozen runpy>|threading\.py|selectors\.py|inferoxy/__main__\.py|"
                      r"inferoxy/cli\.py|inferoxy/runner\.py)|^<module> ")


def read(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append(([LINE.sub(")", frame) for frame in frames.split(";")], int(count)))
    return stacks


def summarise_file(path: Path, title: str, rate: int, duration_s: float, top: int = 12,
                   cpu_percent: float | None = None) -> str:
    """Markdown for one profile; ``cpu_percent`` (from /proc, the authority on how busy it was) heads it."""
    if not path.exists():
        return f"### {title}\n\nno profile ({path.name} was not written; py-spy may lack permission)\n"
    stacks = read(path)
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    waiting = 0
    for frames, count in stacks:
        if WAITING.match(frames[-1]):
            waiting += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            if not PLUMBING.search(frame):
                inside[frame] += count
    working = sum(own.values())
    busy = working / (rate * duration_s) * 100
    # A thread blocked in a C call with no Python frame of its own (a socket read) still looks busy to
    # py-spy; /proc's CPU time does not.
    cpu = "" if cpu_percent is None else f"CPU {cpu_percent:.0f}% of a core (/proc); "
    lines = [f"### {title} ({path.name}): {cpu}{working} samples outside select/poll (≈ {busy:.0f}% of the "
             f"time), {waiting} in them\n",
             "| self % | function | | in % | function |", "|---|---|---|---|---|"]
    share = 100 / max(working, 1)
    # Either column may run out first; the shorter one is padded.
    for (self_name, self_count), (in_name, in_count) in zip_longest(own.most_common(top), inside.most_common(top),
                                                                    fillvalue=("", 0)):
        mine = f"{self_count * share:.1f} | `{self_name}`" if self_name else " | "
        theirs = f"{in_count * share:.1f} | `{in_name}`" if in_name else " | "
        lines.append(f"| {mine} | | {theirs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(summarise_file(args.profile, args.profile.stem, args.rate, args.duration, args.top))


if __name__ == "__main__":
    main()
