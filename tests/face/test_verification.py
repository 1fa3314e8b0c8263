"""`faces verify` quality on the real pairs (accuracy at the encoder's own threshold)."""
from ray_faceid.eval.verification import evaluate_pairs, read_pairs
from ray_faceid.face.analyzer import FaceAnalyzer


def test_pairs_accuracy_beats_the_naive_pipeline(faces_root):
    analyzer = FaceAnalyzer()

    def embed(paths):
        return [f[0].embedding if f else None for f in analyzer.analyze_batch(paths)]

    report = evaluate_pairs(
        embed, read_pairs(faces_root / "pairs.csv"), faces_root, analyzer.spec.key(), analyzer.spec.distance, 0.6
    )
    assert report.pairs == 396
    assert report.accuracy >= 0.985  # the naive dlib pipeline: 0.975
    assert report.roc_auc >= 0.99
    assert report.no_face_pairs == 0
