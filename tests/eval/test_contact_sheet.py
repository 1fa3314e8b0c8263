"""The contact sheet's labels stay inside their own cell: a long name or score line is cut to fit
(it ran into the next column's picture and label), and every line of a label is shown."""
import numpy as np

from ray_faceid.eval.contact_sheet import CELL, contact_sheet


def _ink(region: np.ndarray) -> int:
    return int((region < 128).any(axis=2).sum())


def test_a_long_label_stays_in_its_own_column():
    face = np.full((64, 64, 3), 255, np.uint8)
    sheet = np.asarray(contact_sheet([{"references": [("W" * 40 + "\n" + "M" * 40, face)], "output": face,
                                       "label": ""}]))
    assert _ink(sheet[CELL:, :CELL]) > 0  # the long label is drawn...
    assert _ink(sheet[CELL:, CELL:]) == 0  # ...and none of it in the output's column


def test_every_line_of_a_label_is_shown():
    face = np.full((64, 64, 3), 255, np.uint8)
    lines = ["row-1", "arcface sim 0.81", "dlib sim 0.64", "sface sim 0.70"]
    one = np.asarray(contact_sheet([{"references": [], "output": face, "label": "\n".join(lines[:1])}]))
    four = np.asarray(contact_sheet([{"references": [], "output": face, "label": "\n".join(lines)}]))
    assert four.shape[0] > one.shape[0]  # room for four lines, not two
    line_rows = np.flatnonzero((four[CELL:] < 128).any(axis=(1, 2)))
    gaps = np.flatnonzero(np.diff(line_rows) > 1)
    assert len(gaps) + 1 == len(lines)  # four separate lines of ink
