"""InstantID's pose as catalog rows and API requests give it: the five keypoints of the face in the
image to make (identity/instantid.py's order: the subject's right eye, left eye, nose tip, right and
left mouth corners), each (x, y) as fractions of the image's width and height. Without one, a
frontal face in the middle. Plain pydantic types: the API's schema module imports no model code."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Pose = Annotated[
    list[tuple[Fraction, Fraction]],
    Field(min_length=5, max_length=5, description="InstantID: the face's five keypoints in the image made (right eye, "
          "left eye, nose tip, right and left mouth corners of the subject), each [x, y] as fractions of the width "
          "and height; default: a frontal face in the middle."),
]
