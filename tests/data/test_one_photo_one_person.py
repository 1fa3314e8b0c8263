"""Faces of one photo are different people: no grouping, fresh or grown, puts two of them in one
identity, even where a group photo's faces look alike (small, same light, same camera)."""
import numpy as np

from ray_faceid.data.clustering import cluster_faces, same_photo_identities
from ray_faceid.data.incremental import grow_clusters
from ray_faceid.face.spec import EncoderSpec

SPEC = EncoderSpec(name="toy", dim=2, version="t", license="-", metric="euclidean", threshold=0.6)


def archive(seed=0):
    """Three people with three portraits each (far apart), and one group photo of all three whose
    faces sit close to each other (within the cut), each a little nearer its own person."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    faces = []
    for person, centre in enumerate(centres):
        for shot in range(3):
            faces.append({"face_id": f"p{person}s{shot}", "image_uri": f"p{person}_{shot}.jpg", "person": person,
                          "embedding": (centre + rng.normal(0, 0.05, 2)).tolist()})
    group = np.array([1.4, 1.4])
    for person in range(3):  # 0.1 from each other, ~2 from their own portraits: only the photo links them
        faces.append({"face_id": f"g{person}", "image_uri": "group.jpg", "person": person,
                      "embedding": (group + 0.05 * np.array([person, -person])).tolist()})
    return faces


def identities(labels, faces) -> dict:
    out: dict = {}
    for label, face in zip(labels, faces):
        out.setdefault(label, []).append(face)
    return out


def test_a_fresh_grouping_never_puts_two_faces_of_one_photo_in_one_identity():
    faces = archive()
    embeddings = np.array([f["embedding"] for f in faces])
    photos = [f["image_uri"] for f in faces]
    for method in ("graph", "average"):
        labels = cluster_faces(embeddings, SPEC, method=method, photos=photos)
        assert same_photo_identities(labels, photos) == 0, method
        for members in identities(labels, faces).values():
            assert len({f["image_uri"] for f in members}) == len(members), method
        # the portraits still group by person
        portraits = [(label, f["person"]) for label, f in zip(labels, faces) if f["image_uri"] != "group.jpg"]
        assert len({label for label, _ in portraits}) == 3 and len(set(portraits)) == 3, method
    # without photos (as before) the group photo's faces are one identity: what the count reports
    blind = cluster_faces(embeddings, SPEC)
    assert same_photo_identities(blind, photos) == 1


def test_a_grown_grouping_never_adds_a_face_to_an_identity_holding_its_photo():
    faces = archive()
    portraits = [f for f in faces if f["image_uri"] != "group.jpg"]
    before = {f"cluster_{p:05d}": {f["face_id"] for f in portraits if f["person"] == p} for p in range(3)}
    # A second group photo whose two faces are both nearest person 0's centre (within the cut):
    # only one of them can be person 0.
    near = [{"face_id": f"h{i}", "image_uri": "group2.jpg", "person": -1, "embedding": [0.1 + 0.15 * i, 0.1]}
            for i in range(2)]
    labelled, report = grow_clusters(faces + near, before, SPEC, 0.85)
    by_identity = identities([f["identity"] for f in labelled], labelled)
    for name, members in by_identity.items():
        assert len({f["image_uri"] for f in members}) == len(members), (name, [f["face_id"] for f in members])
    label = {f["face_id"]: f["identity"] for f in labelled}
    assert label["h0"] == "cluster_00000" != label["h1"]  # the nearer one joins; the other is someone else
    assert report["new identities"] >= 3


def test_an_earlier_identity_holding_two_faces_of_one_photo_is_split_when_it_grows():
    """A grouping made before the rule (the group photo's faces in one identity) is repaired, not kept."""
    faces = archive()
    before = {f"cluster_{p:05d}": {f["face_id"] for f in faces if f["person"] == p and f["image_uri"] != "group.jpg"}
              for p in range(3)}
    before["cluster_00003"] = {f["face_id"] for f in faces if f["image_uri"] == "group.jpg"}
    labelled, report = grow_clusters(faces, before, SPEC, 0.85)
    for name, members in identities([f["identity"] for f in labelled], labelled).items():
        assert len({f["image_uri"] for f in members}) == len(members), name
    assert report["earlier identities split (two faces of one photo)"] == 1
    label = {f["face_id"]: f["identity"] for f in labelled}
    assert label["g0"] == "cluster_00003" and len({label["g0"], label["g1"], label["g2"]}) == 3
