"""Faces found in group photos, near and far: the detection policy with and without its small-face pass.

Cases, all from ../shared/data/faces:
- group/*: the 11 group photos, with their people counted by hand (dlib's annotations for the
  PASCAL photos, the manifest's notes, a look at the cast photos);
- far: each group photo shrunk until its smallest face is 20 px and set into a 2400 x 1600
  photo (a nonface/ image enlarged as the background): the far-away people of event photos, which
  HOG at its working resolution cannot see;
- nonface/*: images without a face (every face found there is false).

Recall is counted per photo as min(found, people) over all people; extra faces are max(0, found -
people), per photo. The same run times portraits (one image per identity folder), where the
small-face pass must cost nothing.

    python benchmarks/group_faces.py [--faces ../shared/data/faces] [--no-record]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

from ray_faceid.config import DetectionConfig, FaceConfig  # noqa: E402
from ray_faceid.face.analyzer import FaceAnalyzer  # noqa: E402
from ray_faceid.face.decode import decode_image  # noqa: E402

DEFAULT_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"
PEOPLE = {"dlib_2008_001009.jpg": 2, "dlib_2008_001322.jpg": 3, "dlib_2008_002079.jpg": 6, "face-api_bbt1.jpg": 4,
          "face-api_bbt2.jpg": 3, "face-api_bbt3.jpg": 5, "face-api_bbt4.jpg": 6, "face-api_bbt5.jpg": 5,
          "face_recognition_kit_with_rose.jpg": 2, "face_recognition_obama_and_biden.jpg": 3,
          "face_recognition_two_people.jpg": 2}
FAR_FACE_PX, CANVAS = 20.0, (2400, 1600)


def cases(faces: Path, sizer: FaceAnalyzer) -> list[tuple[str, np.ndarray, int]]:
    backgrounds = sorted((faces / "nonface").iterdir())
    out = []
    for k, (name, people) in enumerate(PEOPLE.items()):
        image = decode_image(str(faces / "group" / name))
        out.append((name, image, people))
        widths = [f.bbox[2] - f.bbox[0] for f in sizer.analyze(image)]
        scale = FAR_FACE_PX / float(np.min(widths))
        small = Image.fromarray(image).resize((round(image.shape[1] * scale), round(image.shape[0] * scale)),
                                              Image.Resampling.LANCZOS)
        canvas = Image.fromarray(decode_image(str(backgrounds[k % len(backgrounds)]))).resize(CANVAS)
        canvas.paste(small, (CANVAS[0] // 3, CANVAS[1] // 2))
        out.append((f"far: {name}", np.asarray(canvas), people))
    out += [(f"nonface: {p.name}", decode_image(str(p)), 0) for p in backgrounds]
    return out


def score(analyzer: FaceAnalyzer, items) -> dict:
    found = people = extra = worst = 0
    seconds, missed = 0.0, []
    for name, image, n in items:
        start = time.perf_counter()
        k = len(analyzer.analyze(image))
        seconds += time.perf_counter() - start
        found, people = found + min(k, n), people + n
        extra, worst = extra + max(0, k - n), max(worst, k - n)
        if k != n:
            missed.append(f"{name} {k}/{n}")
    return {"recall": found / max(people, 1), "found": found, "people": people, "extra": extra, "worst": worst,
            "s_per_image": seconds / len(items), "missed": missed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not (args.faces / "group").is_dir():
        sys.exit(f"no photo set at {args.faces} (pass --faces)")
    analyzers = {
        "fast pass only (before)": FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all", small_faces=False))),
        # A candidate that needs nothing new: dlib's MMOD CNN as the detector, at the same working size.
        "MMOD CNN detector (dlib_model=cnn)": FaceAnalyzer(FaceConfig(detection=DetectionConfig(
            policy="all", dlib_model="cnn", small_faces=False))),
        "with the small-face pass (default)": FaceAnalyzer(FaceConfig(detection=DetectionConfig(policy="all"))),
    }
    items = cases(args.faces, analyzers["with the small-face pass (default)"])
    portraits = [(p.name, decode_image(str(next(iter(sorted(p.glob("*.jpg")))))), 1)
                 for p in sorted(args.faces.iterdir()) if p.is_dir() and p.name not in ("group", "nonface")
                 and any(p.glob("*.jpg"))]
    lines = [f"## group_faces — {time.strftime('%Y-%m-%d')}", "", f"Machine: {machine_line()}.", "",
             "| detection | recall near | recall far | extra faces (worst photo) | s / image (groups) | "
             "s / image (portraits) |", "|---|---|---|---|---|---|"]
    for label, analyzer in analyzers.items():
        near = score(analyzer, [c for c in items if not c[0].startswith(("far", "nonface"))])
        far = score(analyzer, [c for c in items if c[0].startswith("far")])
        empty = score(analyzer, [c for c in items if c[0].startswith("nonface")])
        single = score(analyzer, portraits)
        extra = near["extra"] + far["extra"] + empty["extra"]
        worst = max(near["worst"], far["worst"], empty["worst"])
        groups = (near["s_per_image"] + far["s_per_image"]) / 2
        lines.append(f"| {label} | {near['recall']:.2f} ({near['found']}/{near['people']}) | {far['recall']:.2f} "
                     f"({far['found']}/{far['people']}) | {extra} ({worst}) | {groups:.2f} | "
                     f"{single['s_per_image']:.3f} |")
        print(f"{label}: missed {near['missed'] + far['missed'] + empty['missed']}", file=sys.stderr)
    nonface = sum(c[0].startswith("nonface") for c in items)
    lines += ["", f"Near: the {len(PEOPLE)} group photos; far: the same people with the smallest face at "
              f"{FAR_FACE_PX:.0f} px in a {CANVAS[0]}x{CANVAS[1]} photo; extra faces counted over those and the "
              f"{nonface} nonface images. Portraits: one photo per identity folder (the small-face pass is "
              "skipped where a face is dominant)."]
    print(report(lines, not args.no_record))


if __name__ == "__main__":
    main()
