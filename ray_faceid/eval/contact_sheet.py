"""A contact sheet: per row, the identities' reference crops beside the output, each labelled
with its scores. People judge faces by looking; the numbers sit next to what they measure."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL, LINE, PAD = 160, 15, 4


def _fit(image: Image.Image | np.ndarray) -> Image.Image:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image = image.convert("RGB")
    scale = CELL / max(image.size)  # small outputs are enlarged too: faces are judged at one size
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (CELL, CELL), "white")
    cell.paste(image, ((CELL - image.width) // 2, (CELL - image.height) // 2))
    return cell


def _fitted(draw: ImageDraw.ImageDraw, line: str, font) -> str:
    """The line cut (with an ellipsis) to what fits one cell: a long name ran into the next column."""
    width = CELL - 2 * PAD
    if draw.textlength(line, font=font) <= width:
        return line
    while line and draw.textlength(line + "…", font=font) > width:
        line = line[:-1]
    return line + "…"


def contact_sheet(rows: list[dict]) -> Image.Image:
    """rows: {"references": [(label, image)], "output": image, "label": str} -> one PNG-able image."""
    columns = max(len(r["references"]) for r in rows) + 1 if rows else 1
    lines = max((len(label.split("\n")) for r in rows for label, _ in [*r["references"], (r["label"], None)]),
                default=1)
    label_height = lines * LINE + PAD
    sheet = Image.new("RGB", (columns * CELL, max(1, len(rows)) * (CELL + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for y, row in enumerate(rows):
        top = y * (CELL + label_height)
        cells = [*row["references"], (row["label"], row["output"])]
        for x, (label, image) in enumerate(cells):
            # The output always sits in the last column, so outputs line up down the sheet.
            column = columns - 1 if x == len(cells) - 1 else x
            sheet.paste(_fit(image), (column * CELL, top))
            for k, line in enumerate(label.split("\n")):
                draw.text((column * CELL + PAD, top + CELL + 3 + LINE * k), _fitted(draw, line, font), fill="black",
                          font=font)
    return sheet
