"""A contact sheet: per row, the identities' reference crops beside the output, each labelled
with its scores. People judge faces by looking; the numbers sit next to what they measure."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL, LABEL = 160, 34


def _fit(image: Image.Image | np.ndarray) -> Image.Image:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image = image.convert("RGB")
    scale = CELL / max(image.size)  # small outputs are enlarged too: faces are judged at one size
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (CELL, CELL), "white")
    cell.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    return cell


def contact_sheet(rows: list[dict]) -> Image.Image:
    """rows: {"references": [(label, image)], "output": image, "label": str} -> one PNG-able image."""
    columns = max(len(r["references"]) for r in rows) + 1 if rows else 1
    sheet = Image.new("RGB", (columns * CELL, max(1, len(rows)) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for y, row in enumerate(rows):
        top = y * (CELL + LABEL)
        cells = [*row["references"], (row["label"], row["output"])]
        for x, (label, image) in enumerate(cells):
            # The output always sits in the last column, so outputs line up down the sheet.
            column = columns - 1 if x == len(cells) - 1 else x
            sheet.paste(_fit(image), (column * CELL, top))
            for k, line in enumerate(label.split("\n")[:2]):
                draw.text((column * CELL + 4, top + CELL + 3 + 15 * k), line[:26], fill="black", font=font)
    return sheet
