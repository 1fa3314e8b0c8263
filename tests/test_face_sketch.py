"""An erased person's face stays refused: enrolled again without a name, it needs a new consent
reference; other people enroll as before. The tombstone keeps a sketch, not the face."""
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


def enroll(registry, name, embeddings, spec, **kw):
    crops = [np.zeros((8, 8, 3), np.uint8)]
    return registry.create("default", name, "consent-1", embeddings, np.ones(len(embeddings), np.float32), spec,
                           crops, [], **kw)["id"]


def test_an_erased_face_enrolled_without_a_name_needs_new_consent(tmp_path, faces):
    from ray_faceid import tombstones

    tom, tom_again, others, spec = faces
    registry = Registry(str(tmp_path / "registry"))
    erase_identity(registry, "default", enroll(registry, "tom", tom, spec))
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
    assert set(stone) == {"id_sha256", "tenant", "erased", "sequence", "consent", "person_keys", "key_scheme",
                          "face_sketch"}


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
