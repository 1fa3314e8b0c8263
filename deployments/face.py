"""FaceEncoder deployment: decode + detect + align + embed, batched across requests."""
from __future__ import annotations

import io

from PIL import Image
from ray import serve

from deployments.memory import replica_memory
from ray_faceid.config import FaceConfig, ServeConfig
from ray_faceid.errors import FaceIdError


class FaceEncoder:
    def __init__(self, config_json: str):
        from ray_faceid.face.analyzer import FaceAnalyzer

        config = ServeConfig.model_validate_json(config_json)
        limits = config.limits
        face = config.face.model_copy(update={
            "detection": config.face.detection.model_copy(update={"policy": "all"}),
            "decode": limits.decode(max_side=limits.max_decode_side),
        })
        self.analyzer = FaceAnalyzer(FaceConfig.model_validate(face.model_dump()))
        self.analyze_batch.set_max_batch_size(config.encoder_batch_size)
        self.analyze_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    def spec(self) -> dict:
        return self.analyzer.spec.model_dump()

    def ping(self) -> bool:
        return True

    def memory(self, reset_peak: bool = False) -> dict:
        return replica_memory(reset_peak)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def analyze_batch(self, images: list[bytes]) -> list[dict]:
        """For each image: {"faces": [...], "batch_size": n} or {"error": code, "message": ..., "status": ...}."""
        from ray_faceid.face.align import align, loose_template
        from ray_faceid.registry import REFERENCE_CROP

        # Decoded once here: the faces' crops come from the same pixels the analyzer saw.
        decoded: list = []
        for data in images:
            try:
                decoded.append(self.analyzer.load(data))
            except FaceIdError as exc:
                decoded.append(exc)
        arrays = [d for d in decoded if not isinstance(d, FaceIdError)]
        found = iter(self.analyzer.analyze_batch(arrays, return_errors=True))
        out = []
        for image in decoded:
            result = image if isinstance(image, FaceIdError) else next(found)
            if isinstance(result, FaceIdError):
                out.append({"error": result.code, "message": result.message, "status": result.status})
                continue
            faces = []
            for face in result:
                crop, _ = align(image, face.landmarks, loose_template(REFERENCE_CROP))
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, "PNG")
                faces.append({**face.to_dict(with_embedding=True), "crop_png": buf.getvalue()})
            out.append({"faces": faces, "batch_size": len(images)})
        return out

    async def analyze(self, image: bytes) -> dict:
        return await self.analyze_batch(image)

