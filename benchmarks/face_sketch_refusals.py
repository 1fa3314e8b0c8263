"""Face sketches against erased people (ray_faceid/face_sketch.py): how often an unrelated person is
refused (false refusal) and how often an erased person's own face gets through (miss), with 10, 100
and 1,000 erased people in the tenant, at the shipped point (it tightens with the count) and at the
fixed point it replaces (0.75 x the encoder's threshold, whatever the count).

Each labelled person's photos are split in two: the first half is sketched as the erased person,
the second half enrolls. A bit differs with probability angle / pi per hyperplane, independently,
so for each (sketch, enrollment) pair the chance of a match at a point is exact given the angle
between their mean embeddings (a binomial tail); a tenant of N erased people refuses an unrelated
enrollment with probability 1 - prod(1 - p) over the N sketches, estimated with the erased drawn
from the labelled people (with replacement past their number: the photo set has ~30 people). The
shipped sketches' own bits (fixed planes) are also counted directly for the first row.

    python benchmarks/face_sketch_refusals.py [--faces ../shared/data/faces] [--no-record]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, photo_set_arguments, report  # noqa: E402
from cluster_quality import NOT_PEOPLE  # noqa: E402
from recognizers import PHOTO, largest_faces  # noqa: E402

from ray_faceid import face_sketch  # noqa: E402
from ray_faceid.face.analyzer import FaceAnalyzer  # noqa: E402

COUNTS = (10, 100, 1000)
OLD_STRICT = 0.75


def unit_mean(vectors: np.ndarray) -> np.ndarray:
    mean = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).mean(axis=0)
    return mean / np.linalg.norm(mean)


def main() -> None:
    args = photo_set_arguments(__doc__.splitlines()[0])
    root = Path(args.faces)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and d.name not in NOT_PEOPLE)
    if not folders:
        sys.exit(f"no identity folders at {root}: pass --faces DIR")
    analyzer = FaceAnalyzer()
    spec = analyzer.spec
    erased, enrolling, norms = [], [], []
    for folder in folders:
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO)
        found, _ = largest_faces(analyzer, photos)
        vectors = [found[p] for p in photos if p in found]
        if len(vectors) < 2:
            continue
        half = len(vectors) // 2
        erased.append(np.stack(vectors[:half]))
        enrolling.append(np.stack(vectors[half:]))
        norms.append(float(np.linalg.norm(np.stack(vectors[half:]), axis=1).mean()))
    people = len(erased)
    centres_a = np.stack([unit_mean(v) for v in erased])
    centres_b = np.stack([unit_mean(v) for v in enrolling])
    angles = np.arccos(np.clip(centres_b @ centres_a.T, -1, 1))  # [enrolling j, erased i]
    same = np.eye(people, dtype=bool)

    def match_chance(max_bits: np.ndarray) -> np.ndarray:
        """Per (enrolling, erased) pair: the chance of a match at each enrolling person's point."""
        return binom.cdf(max_bits[:, None], face_sketch.BITS, angles / math.pi)

    rng = np.random.default_rng(0)
    rows = []
    for count in COUNTS:
        for rule in ("shipped: tightens with the count", f"fixed: {OLD_STRICT} x threshold"):
            if rule.startswith("shipped"):
                points = np.array([face_sketch.max_differing_bits(face_sketch.same_person_angle(spec, n), count)
                                   for n in norms])
            else:
                points = np.array([math.floor(face_sketch.BITS * face_sketch.same_person_angle(
                    spec.model_copy(update={"threshold": OLD_STRICT * spec.threshold}), n) / math.pi) for n in norms])
            p = match_chance(points)
            refused = []
            for j in range(people):  # an unrelated enrollment against `count` erased people drawn from the others
                others = np.flatnonzero(~same[j])
                drawn = rng.choice(others, size=count, replace=count > len(others))
                refused.append(1 - np.prod(1 - p[j, drawn]))
            miss = 1 - np.mean(p[same])
            rows.append((count, rule, float(np.mean(refused)), float(miss), int(np.median(points))))

    # The shipped sketches' own bits (fixed planes), counted: 10 erased, the rest enrolling.
    direct_refused, direct_missed, trials = 0, 0, 0
    for trial in range(20):
        chosen = rng.choice(people, size=min(10, people - 1), replace=False)
        probes = {j: face_sketch.Probe(enrolling[j], spec) for j in range(people)}
        stored = {i: face_sketch.sketch(erased[i], spec) for i in chosen}
        for j in range(people):
            hits = [i for i in chosen if probes[j].matches(stored[i], len(chosen))]
            if j in chosen:
                direct_missed += j not in hits
            else:
                direct_refused += bool(hits)
                trials += 1
    direct = (direct_refused / max(trials, 1), direct_missed / (20 * min(10, people - 1)))

    lines = [f"\n## Face sketches against erased people ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine_line()}. Encoder {spec.key()} (threshold {spec.threshold}); {people} labelled people "
             f"of {root.name}/, half of each one's photos sketched as erased, the other half enrolling; "
             f"{face_sketch.BITS} bits, alpha {face_sketch.ALPHA}. Binomial-exact per pair (see the script).", "",
             "| erased people | matching point | unrelated person refused | erased person let through | "
             "most differing bits |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {rule} | {fr:.2%} | {miss:.1%} | {bits} |" for c, rule, fr, miss, bits in rows]
    lines += ["", f"Counted on the shipped sketches themselves (10 erased, 20 draws): {direct[0]:.2%} of unrelated "
              f"people refused, {direct[1]:.1%} of erased people let through."]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
