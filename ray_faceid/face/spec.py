"""EncoderSpec: what made an embedding. Attached to every embedding; mixing specs is refused."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ray_faceid.errors import EncoderMismatch


class EncoderSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Encoder family, e.g. 'dlib_resnet' or 'arcface_onnx'.")
    dim: int = Field(gt=0, description="Embedding dimension.")
    version: str = Field(description="Weights identity: file name and content hash prefix.")
    license: str = Field(description="Licence of the weights, as their publisher states it.")
    metric: Literal["euclidean", "cosine"] = Field(description="Distance the threshold applies to.")
    threshold: float = Field(description="Default same-person threshold: distance <= threshold means same person.")

    def key(self) -> str:
        """What must match for two embeddings to be comparable."""
        return f"{self.name}/{self.dim}/{self.version}"

    def check_compatible(self, other: "EncoderSpec", what: str = "embeddings") -> None:
        if self.key() != other.key():
            raise EncoderMismatch(
                f"{what} were made by encoder {other.key()}, but this needs {self.key()}: "
                "re-embed with the same encoder (re-enroll the identity or re-run ingest)"
            )

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Distance between embeddings (rows of a and b broadcast), in this encoder's metric."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if self.metric == "euclidean":
            return np.linalg.norm(a - b, axis=-1)
        return 1.0 - cosine_similarity(a, b)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)
