"""Captions of target shots for cross-training. Pluggable: anything with `caption(face) -> str`.
The default builds the caption from measured attributes; an LLM/VLM captioner can replace it where
its weights are available."""
from __future__ import annotations

from typing import Protocol


class Captioner(Protocol):
    def caption(self, face: dict) -> str: ...


class TemplateCaptioner:
    """'a photo of a person, smiling, head turned to their left, eyes closed' from a faces row."""

    def __init__(self, subject: str = "a photo of a person"):
        self.subject = subject

    def caption(self, face: dict) -> str:
        parts = [self.subject]
        smile, mouth, eyes = face.get("smile"), face.get("mouth_open"), face.get("eyes_open")
        yaw, pitch = face.get("yaw") or 0.0, face.get("pitch") or 0.0
        if smile is not None:
            parts.append("smiling" if smile > 0.5 else "neutral expression")
        if mouth is not None and mouth > 0.5:
            parts.append("mouth open")
        if abs(yaw) >= 50:
            parts.append(f"in profile facing their {'left' if yaw > 0 else 'right'}")
        elif abs(yaw) >= 15:
            parts.append(f"head turned to their {'left' if yaw > 0 else 'right'}")
        else:
            parts.append("facing the camera")
        if pitch >= 15:
            parts.append("looking up")
        elif pitch <= -15:
            parts.append("looking down")
        if eyes is not None and eyes < 0.2:
            parts.append("eyes closed")
        if face.get("extra_labels"):
            parts.append(str(face["extra_labels"]))
        return ", ".join(parts)
