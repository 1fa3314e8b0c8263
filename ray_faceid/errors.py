"""The one typed error family every layer raises.

Each error carries an HTTP status and a short machine code so the Serve ingress, the CLI and
the Ray jobs report the same failure the same way: the API answers `status` with the message,
the CLI exits 2 with it, a job records `code` and the message in its errors table.
"""
from __future__ import annotations


class FaceIdError(Exception):
    """Base of every error ray_faceid raises on purpose."""

    status: int = 400
    code: str = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(FaceIdError):
    """A request or a file that cannot be used as given."""

    status = 422
    code = "bad_input"


class BadImage(BadInput):
    """Bytes that are not a usable image: empty, corrupt, truncated, unsupported or too large."""

    code = "bad_image"


class NoFace(BadInput):
    """An image in which no face was found where one is required."""

    code = "no_face"


class TooManyFaces(BadInput):
    """An image with several faces where exactly one is required."""

    code = "too_many_faces"


class NotFound(FaceIdError):
    """An identity, adapter or file that does not exist (or belongs to another tenant)."""

    status = 404
    code = "not_found"


class NameTaken(FaceIdError):
    """A person's name already used by another identity of the tenant (names are unique per tenant)."""

    status = 409
    code = "name_taken"


class Conflict(FaceIdError):
    """A write that lost a race with another writer of the same identity (retry it)."""

    status = 409
    code = "conflict"


class Erased(FaceIdError):
    """An identity that was deleted: nothing may be written to it again."""

    status = 410
    code = "erased"


class ErasedPerson(FaceIdError):
    """An enrollment of a person whose identity was erased, without a new consent reference."""

    status = 409
    code = "erased_person"


class ConsentWithdrawn(FaceIdError):
    """An enrollment under a consent reference an erasure withdrew (refused for good, in the tenant)."""

    status = 409
    code = "consent_withdrawn"


class EncoderMismatch(FaceIdError):
    """Embeddings or an adapter made by one face encoder used with another."""

    status = 409
    code = "encoder_mismatch"


class BaseModelMismatch(FaceIdError):
    """An adapter or engine built for one base model used with another."""

    status = 409
    code = "base_model_mismatch"


class UnsupportedModel(BadInput):
    """A base model folder of a family this system does not run (FLUX, SD3, a bare UNet, ...), or an
    incomplete one; found from its configs before anything heavy loads."""

    code = "unsupported_model"


class AdapterMismatch(FaceIdError):
    """A module trained on one identity adapter's tokens (the IMR) used with another adapter."""

    status = 409
    code = "adapter_mismatch"


class BadEdit(BadInput):
    """An attribute edit naming an attribute the flow does not have, or a value out of its range."""

    code = "bad_edit"


class BackendUnavailable(FaceIdError):
    """A selected backend whose optional dependency or model files are missing."""

    status = 503
    code = "backend_unavailable"


class StorageError(FaceIdError):
    """A URI that cannot be read or written."""

    status = 502
    code = "storage_error"
