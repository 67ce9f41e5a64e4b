"""Accuracy and speed of the experts' backends on the project's test images; prints Markdown tables.

    python benchmarks/experts_bench.py [--repeats 3] [--backends rapidocr,tesseract,easyocr]

OCR set: tests/data/images/text.png, text2.png and tests/data/images/ocr/* (ground truth in truth.json:
small, coloured serif, rotated, low-contrast JPEG, monospace, a sign and an overlay on photos). Per backend:
- exact: images whose lines all match the truth exactly (whitespace normalised; extra lines, e.g. real
  scene text in a photo, are allowed);
- char acc: mean over truth lines of 1 - CER against the closest output line;
- noise: characters returned on the five photos without added text (some of them hold real scene text);
- ms/image: median over `repeats` warm runs, summed over the set / its size; load: first construction.
Detection: the CenterNet (converted ONNX) on the five photos, ms/image (median, warm) and what it found.
Needs `scripts/setup-experts.sh` done. Run it alone: the machine has 2 cores, timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experts import detection, ocr  # noqa: E402

IMAGES = ROOT / "tests" / "data" / "images"
PHOTOS = ["dog.jpg", "horses.jpg", "giraffe.jpg", "person.jpg", "eagle.jpg"]


def ocr_set() -> dict[str, list[str]]:
    truth = {
        "text.png": ["Hello World 2024", "LLaMA-Adapter OCR test"],
        "text2.png": ["The quick brown fox jumps over the lazy dog.",
                      "Invoice #4521: total $1,337.90 (due 2025-03-14)"],
    }
    truth.update({f"ocr/{k}": v for k, v in json.loads((IMAGES / "ocr" / "truth.json").read_text()).items()})
    return truth


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def line_accuracy(truth: str, got: list[str]) -> float:
    if not got:
        return 0.0
    return max(0.0, 1 - min(levenshtein(truth, g) for g in got) / len(truth))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def load(name: str) -> Image.Image:
    image = Image.open(IMAGES / name).convert("RGB")
    image.load()
    return image


def bench_ocr(backend: str, repeats: int, verbose: bool = False) -> dict:
    t0 = time.perf_counter()
    expert = ocr.create({"backend": backend})
    expert.warmup()
    first = load("text.png")
    t1 = time.perf_counter()
    expert.read(first)  # the first call also pays for lazy initialisation inside the engines
    load_s, first_call_s = t1 - t0, time.perf_counter() - t1
    exact, accs, seconds = 0, [], []
    for name, truth in ocr_set().items():
        image = load(name)
        s, lines = timed(lambda image=image: expert.read(image), repeats)
        got = [" ".join(ln.text.split()) for ln in lines]
        seconds.append(s)
        exact += all(t in got for t in truth)
        if verbose and not all(t in got for t in truth):
            print(f"  {backend} misread {name}: {got}")
        accs.extend(line_accuracy(t, got) for t in truth)
    noise = 0
    for name in PHOTOS:
        image = load(name)
        s, lines = timed(lambda image=image: expert.read(image), repeats)
        seconds.append(s)
        noise += sum(len(ln.text) for ln in lines)
    return {"backend": backend, "exact": f"{exact}/{len(ocr_set())}", "acc": statistics.mean(accs),
            "noise": noise, "ms": 1000 * statistics.mean(seconds), "load": load_s, "first": first_call_s}


def bench_detection(repeats: int) -> list[dict]:
    expert = detection.create({"backend": "centernet"})
    t0 = time.perf_counter()
    expert.warmup()
    expert.detect(load("dog.jpg"))
    print(f"CenterNet load + first call: {time.perf_counter() - t0:.2f} s\n")
    rows = []
    for name in PHOTOS:
        image = load(name)
        s, dets = timed(lambda image=image: expert.detect(image), repeats)
        rows.append({"image": name, "ms": 1000 * s,
                     "found": ", ".join(f"{d.label} {d.score:.2f}" for d in dets) or "-"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="rapidocr,tesseract,easyocr")
    parser.add_argument("--verbose", action="store_true", help="print each misread image")
    args = parser.parse_args()

    rows = [bench_ocr(b, args.repeats, args.verbose) for b in args.backends.split(",") if b]
    print(f"OCR on {len(ocr_set())} text images + {len(PHOTOS)} photos without added text "
          f"(median of {args.repeats} warm runs)\n")
    print("| backend | exact images | char accuracy | noise chars on photos | ms/image | load s | first call s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['exact']} | {r['acc']:.3f} | {r['noise']} | {r['ms']:.0f} | "
              f"{r['load']:.1f} | {r['first']:.1f} |")
    print()
    det = bench_detection(args.repeats)
    print("| photo | ms/image | detections (score >= 0.3, class-agnostic NMS 0.4) |")
    print("|---|---|---|")
    for r in det:
        print(f"| {r['image']} | {r['ms']:.0f} | {r['found']} |")


if __name__ == "__main__":
    main()
