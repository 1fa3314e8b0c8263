"""FaceAnalyzer vs the naive dlib pipeline, on the real photos of ../shared/data/faces.

The baseline is what a user of the face_recognition library writes: each image decoded at full
resolution, HOG detection with one 2x upsampling, 68-point landmarks, one descriptor per face,
one image at a time. Both sides then score pairs.csv at the encoder's own threshold (0.6).

    python benchmarks/face_throughput.py [--faces ../shared/data/faces] [--no-record]

Prints a comparison table and appends it, with date and machine, to benchmarks/BENCHMARKS.md.
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

from ray_faceid.eval.verification import evaluate_pairs, read_pairs  # noqa: E402
from ray_faceid.face.analyzer import FaceAnalyzer  # noqa: E402

DEFAULT_FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces"


class NaiveDlib:
    def __init__(self):
        import dlib

        from ray_faceid.face.backends.dlib_backend import model_path

        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_path("shape_predictor_68_face_landmarks.dat")))
        self.recognizer = dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat")))
        self.faces = 0

    def embed(self, paths: list[str]) -> list[np.ndarray | None]:
        out = []
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"))
            rects = self.detector(image, 1)
            vectors = [
                np.array(self.recognizer.compute_face_descriptor(image, self.predictor(image, r), 1)) for r in rects
            ]
            self.faces += len(vectors)
            largest = max(range(len(rects)), key=lambda i: rects[i].area(), default=None)
            out.append(None if largest is None else vectors[largest])
        return out


def run(faces_root: Path, record_results: bool) -> str:
    pairs = read_pairs(faces_root / "pairs.csv")
    analyzer = FaceAnalyzer()
    spec = analyzer.spec
    counted = {"faces": 0}

    def embed_analyzer(paths):
        found = analyzer.analyze_batch(paths)
        counted["faces"] += sum(len(f) for f in found)
        return [f[0].embedding if f else None for f in found]

    analyzer.analyze(str(next(iter(faces_root.glob("obama/*.jpg")))))  # warm the per-thread models
    naive = NaiveDlib()
    rows = []
    for name, embed, faces in (
        ("naive dlib (full-res HOG x2 upsample, 68 pts, 1 image at a time)", naive.embed, lambda: naive.faces),
        ("FaceAnalyzer (bounded resolution, 5 pts, threads, CNN fallback, batched torch port of the same ResNet)", embed_analyzer,
         lambda: counted["faces"]),
    ):
        result = evaluate_pairs(embed, pairs, faces_root, spec.key(), spec.distance, spec.threshold)
        rows.append((name, result, faces()))
    base = rows[0][1]
    lines = [
        f"### face_throughput — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"{base.images} images of {faces_root.name}/, {base.pairs} pairs, threshold {spec.threshold} ({spec.key()})",
        "",
        "| pipeline | images/s | s/face | accuracy | ROC AUC | pairs with no face | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r, n_faces in rows:
        lines.append(
            f"| {name} | {r.images_per_s:.2f} | {r.seconds / max(n_faces, 1):.3f} | {r.accuracy:.4f} | "
            f"{r.roc_auc:.4f} | {r.no_face_pairs} | {r.images_per_s / base.images_per_s:.2f}x |"
        )
    return report(lines, record_results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not (args.faces / "pairs.csv").is_file():
        sys.exit(f"no pairs.csv under {args.faces}: pass --faces DIR (the shared photo set)")
    run(args.faces, not args.no_record)


if __name__ == "__main__":
    main()
