"""An erased person's face stays refused: enrolled again, with or without a name, it needs a new
consent reference, and the consent they withdrew is never used again in the tenant; other people
enroll as before. The tombstone keeps a sketch, not the face."""
import numpy as np
import pytest
from PIL import Image, ImageOps

from ray_faceid.erasure import erase_identity
from ray_faceid.errors import BadInput, ErasedPerson
from ray_faceid.registry import Registry


@pytest.fixture(scope="module")
def faces(analyzer, sample_photos):
    """Tom Hanks' photo, the same photo mirrored and smaller (another shot of him), and six other people."""
    photo = Image.open(sample_photos["Tom_Hanks_54745.png"]).convert("RGB")
    again = ImageOps.mirror(photo).resize((photo.width * 3 // 4, photo.height * 3 // 4))
    tom = analyzer.analyze(np.asarray(photo))[0]
    others = [f.embedding[None] for f in analyzer.analyze(str(sample_photos["t1.jpg"]))]
    return tom.embedding[None], analyzer.analyze(np.asarray(again))[0].embedding[None], others, analyzer.spec


def enroll(registry, name, embeddings, spec, consent=None, **kw):
    """Each person under a consent reference of their own (an erasure withdraws it for the tenant)."""
    crops = [np.zeros((8, 8, 3), np.uint8)]
    consent = consent or f"consent-{name or 'unnamed'}-{np.random.default_rng().integers(1 << 30)}"
    return registry.create("default", name, consent, embeddings, np.ones(len(embeddings), np.float32), spec,
                           crops, [], **kw)["id"]


def test_an_erased_face_enrolled_without_a_name_needs_new_consent(tmp_path, faces):
    from ray_faceid import tombstones

    tom, tom_again, others, spec = faces
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "tom", tom, spec, consent="consent-1"))
    with pytest.raises(ErasedPerson, match="matches a person erased from this registry") as refused:
        enroll(registry, "", tom_again, spec)
    assert "--reconsent" in refused.value.message
    with pytest.raises(BadInput, match="one the person withdrew"):
        enroll(registry, "", tom_again, spec, reconsent="consent-1")
    assert enroll(registry, "", tom_again, spec, reconsent="consent-2")
    assert len(others) == 6 and all(enroll(registry, "", other, spec) for other in others)  # nobody else refused
    stone = tombstones.all_for(registry.store, "default")[0]
    assert stone["face_sketch"]["encoder"] == spec.key() and len(stone["face_sketch"]["bits"]) == 128
    # what a tombstone keeps, and nothing else: no embedding, no name, no id
    assert set(stone) == {"id_sha256", "tenant", "erased", "sequence", "consent", "withdrawn", "person_keys",
                          "key_scheme", "key_id", "face_sketch"}


def test_an_erased_face_is_refused_by_each_encoder_the_person_had_embeddings_of(tmp_path, faces):
    """Enrolled with one encoder, another's embeddings added (`identities embed`), erased: enrolled
    again with the second encoder, the face is recognised. The second encoder is stood in for by a
    fixed rotation of the first's space (the same geometry, other coordinates)."""
    from ray_faceid import tombstones
    from ray_faceid.registry_secret import keys_for

    tom, tom_again, others, spec = faces
    second = spec.model_copy(update={"name": "second_encoder"})
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((spec.dim, spec.dim)))[0].astype(np.float32)
    registry = Registry(str(tmp_path / "registry"))
    tom_id = enroll(registry, "tom", tom, spec)
    registry.add_embeddings("default", tom_id, tom @ rotation, np.ones(1, np.float32), second)
    erase_identity(registry, "default", tom_id)
    with pytest.raises(ErasedPerson, match="matches a person erased"):
        enroll(registry, "", tom_again @ rotation, second)
    with pytest.raises(ErasedPerson, match="matches a person erased"):
        enroll(registry, "", tom_again, spec)
    assert all(enroll(registry, "", other @ rotation, second) for other in others)  # nobody else refused
    (stone,) = [t for t in tombstones.all_for(registry.store, "default") if t["id_sha256"] ==
                tombstones.digest("id", tom_id)]
    (added,) = stone["other_face_sketches"]
    assert added["encoder"] == second.key() and len(added["bits"]) == 128
    # Each sketch under its own mask (one mask on both would give away how the two sketches differ):
    # the stored bits unmask, with the second encoder's own mask, to the sketch of what it saw.
    from ray_faceid import face_sketch

    keys = keys_for(registry.store)
    unmasked = bytes(a ^ b for a, b in zip(bytes.fromhex(added["bits"]),
                                           tombstones.sketch_mask(keys, stone["id_sha256"], second.key())))
    assert unmasked == face_sketch.sketch(tom @ rotation, second)
    # Re-keying drops a damaged second sketch, keeping the tombstone and its first sketch.
    damaged = dict(stone, other_face_sketches=[{"bits": "not hex"}])
    rekeyed = tombstones.rekey(damaged, keys, keys)
    assert rekeyed["other_face_sketches"] == [] and rekeyed["face_sketch"] == stone["face_sketch"]
    for first in ({"encoder": spec.key()}, None):  # a first sketch without bits, or none: the second stays
        rekeyed = tombstones.rekey(dict(stone, face_sketch=first), keys, keys)
        assert "face_sketch" not in rekeyed and rekeyed["other_face_sketches"] == stone["other_face_sketches"]


def test_an_erased_person_under_a_new_name_or_their_withdrawn_consent_is_refused(tmp_path, faces):
    """Every route enrolls through Registry.create: named, unnamed and dataset-labelled enrollments."""
    from ray_faceid.errors import ConsentWithdrawn

    tom, tom_again, others, spec = faces
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "tom", tom, spec, consent="form-tom"))
    for name, source in (("thomas", None), ("", None), ("t-hanks", {"identity": "hanks", "dataset": "/d"})):
        with pytest.raises(ErasedPerson, match="matches a person erased"):  # his face, under another name
            enroll(registry, name, tom_again, spec, consent="form-new", source=source)
        with pytest.raises(ErasedPerson):  # and with the very consent he withdrew
            enroll(registry, name, tom_again, spec, consent="form-tom", source=source)
    with pytest.raises(ConsentWithdrawn, match="'form-tom' was withdrawn"):  # that consent, for anyone at all
        enroll(registry, "someone", others[0], spec, consent="form-tom")
    assert enroll(registry, "thomas", tom_again, spec, consent="form-tom", reconsent="form-tom-2")
    assert all(enroll(registry, f"p{k}", other, spec) for k, other in enumerate(others))


def test_a_damaged_sketch_is_skipped_not_a_failed_enrollment(tmp_path, faces):
    import json

    from ray_faceid import tombstones

    tom, tom_again, others, spec = faces
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "tom", tom, spec))
    (stone_path,) = (tmp_path / "registry" / "default" / tombstones.FOLDER).glob("*.json")
    stone = json.loads(stone_path.read_text())
    stone["face_sketch"]["bits"] = "not hex"
    stone_path.write_text(json.dumps(stone))
    assert enroll(registry, "", others[0], spec)


@pytest.mark.parametrize("damage", ["other width", "NaN", "zero"])
def test_an_erasure_finishes_when_the_embeddings_cannot_be_sketched(tmp_path, faces, damage):
    """Embeddings that give no direction: the person is erased all the same, the tombstone keeps no
    sketch, and such embeddings never match one."""
    from ray_faceid import tombstones

    tom, _, others, spec = faces
    bad = {"other width": np.ones((2, 64), np.float32), "NaN": np.full_like(tom, np.nan),
           "zero": np.zeros_like(tom)}[damage]
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "tom", tom, spec))
    ident = enroll(registry, "x", tom, spec, reconsent="consent-2")
    np.savez(tmp_path / "registry" / "default" / ident / "embeddings.npz", embeddings=bad,
             quality=np.ones(len(bad), np.float32))
    erase_identity(registry, "default", ident)
    assert registry.list("default") == []
    assert [("face_sketch" in t) for t in tombstones.all_for(registry.store, "default")].count(False) == 1
    if damage != "other width":
        assert enroll(registry, "", bad, spec)  # refused by nothing: no direction to compare


def test_replacing_an_enrollment_withdraws_no_consent(tmp_path, faces):
    """`name_exists=replace` retires the old identity of the same person: its consent stays usable."""
    tom, tom_again, _, spec = faces
    registry = Registry(str(tmp_path / "registry"))
    enroll(registry, "tom", tom, spec, consent="form-tom")
    enroll(registry, "tom", tom_again, spec, consent="form-tom", name_exists="replace")
    assert enroll(registry, "tom", tom, spec, consent="form-tom", name_exists="replace")
    erase_identity(registry, "default", "tom")
    from ray_faceid.errors import ConsentWithdrawn

    with pytest.raises(ConsentWithdrawn):  # an erasure does, whatever the case and spaces
        enroll(registry, "someone", faces[2][0], spec, consent=" FORM-TOM ")
