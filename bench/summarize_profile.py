"""Summarize a py-spy raw (collapsed-stack) profile: inclusive and own share per function.

Usage: python bench/summarize_profile.py PROFILE.txt [TOP]
"""

import sys
from collections import Counter


def frame_name(frame: str) -> str:
    name = frame.split(" (")[0]
    where = frame.split("/")[-1].split(":")[0]
    return f"{name} ({where})"


def main(path: str, top: int) -> None:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path) as lines:
        for line in lines:
            stack, _, samples = line.rstrip().rpartition(" ")
            n = int(samples)
            total += n
            frames = [frame_name(f) for f in stack.split(";")]
            own[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    print(f"total samples {total}")
    print("--- inclusive")
    for name, n in inclusive.most_common(top):
        print(f"{n * 100 / total:5.1f}% {name}")
    print("--- own")
    for name, n in own.most_common(top // 2):
        print(f"{n * 100 / total:5.1f}% {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
