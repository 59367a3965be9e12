"""A benchmark dataset of instruction rows with realistic, widely varied lengths (seeded, no download).

Three tasks mixed: capitalise a passage (long answer), count its words (very short answer), and list its
first words in reverse (medium). Passage lengths are log-normal, so a batch mixes short and long rows the
way real instruction data does, and padding to the longest row wastes what it wastes in practice.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river stone garden window market letter doctor music "
         "winter summer bridge village engine harbour forest kitchen mountain lantern orchard silver copper").split()


def _passage(rng: random.Random, median_words: int, cap: int) -> list[str]:
    n = int(min(cap, max(3, rng.lognormvariate(math.log(median_words), 0.8))))
    return [rng.choice(WORDS) for _ in range(n)]


def make_row(rng: random.Random) -> dict:
    task = rng.random()
    if task < 0.4:
        words = _passage(rng, 40, 140)
        return {"instruction": "Rewrite the passage with every word capitalised.", "input": " ".join(words),
                "output": " ".join(w.capitalize() for w in words)}
    if task < 0.7:
        words = _passage(rng, 60, 250)
        return {"instruction": "How many words are in the passage? Answer with a number.", "input": " ".join(words),
                "output": str(len(words))}
    words = _passage(rng, 50, 220)
    k = min(len(words), rng.randint(3, 12))
    return {"instruction": f"List the first {k} words of the passage in reverse order, separated by commas.",
            "input": " ".join(words), "output": ", ".join(reversed(words[:k]))}


def write(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(make_row(rng)) + "\n")
    return path
