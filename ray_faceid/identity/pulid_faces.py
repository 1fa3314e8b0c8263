"""A photo read as PuLID-FLUX's pipeline reads it (`get_id_embedding`), from encoders the user gives:

0. a photo larger than 1024 pixels shrunk to that long edge (Lanczos), as PuLID's app does;
1. the largest face's ArcFace embedding, raw, from the face stack (PuLID's: antelopev2's glintr100,
   `--insightface-root`), and its five points;
2. the face aligned to FFHQ's five-point template at 512 x 512 (a partial affine fitted by least
   median of squares, grey outside the photo), as facexlib aligns it;
3. BiSeNet's classes of that face (face/face_parsing.py): background, ears, earrings, neck, necklace,
   clothes and hat made white, the rest (face, hair) turned grey;
4. EVA02-CLIP's vision tower (face/eva_clip.py) on that image, resized bicubically to its input
   with antialiasing (torchvision's tensor resize does so from 0.17, the newer of PuLID's pins; its
   older pin did not): the class token's embedding and five hidden states.

PuLID-FLUX's IDFormer turns the two embeddings and the hidden states into the person's ID tokens
(PulidFlux.encode). Where this differs from PuLID's pipeline: the five points come from the face
stack's detector (SCRFD in antelopev2's pack) rather than facexlib's RetinaFace, whose weights PuLID
downloads; several photos give the mean of their tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_faceid import storage
from ray_faceid.errors import BackendUnavailable, BadInput

log = logging.getLogger(__name__)

ALIGNED = 512
ANTELOPE_RECOGNISER = "glintr100.onnx"  # antelopev2's ArcFace, whose raw embeddings PuLID-FLUX reads
LONG_EDGE = 1024  # PuLID's app shrinks each photo to this long edge before its encoders read it
FFHQ_FIVE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                      [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)  # eyes, nose, mouth corners
OUTSIDE = (132, 133, 135)  # RGB of facexlib's border grey (135, 133, 132 in its BGR)
EVA_NAMES = ("EVA02_CLIP_L_336_psz14_s6B.pt", "EVA02_CLIP_L_336_psz14_s6B.safetensors")
PARSER_NAMES = ("parsing_bisenet.pth", "parsing_bisenet.safetensors")
FOLDER_HELP = ("a folder holding EVA02-CLIP-L-14-336 (QuanSun/EVA-CLIP's EVA02_CLIP_L_336_psz14_s6B.pt) and facexlib's "
               "face parser (parsing_bisenet.pth)")


@dataclass
class PulidFeatures:
    """What the encoders read of one person's photos (N photos): what PuLID's IDFormer takes."""

    arcface: torch.Tensor  # N x 512, raw
    eva: torch.Tensor  # N x 768
    hidden: list[torch.Tensor]  # 5 x (N x tokens x width)


def _one_of(folder: str, names: tuple[str, ...]) -> str:
    for name in names:
        path = storage.join(folder, name)
        if storage.exists(path):
            return path
    raise BadInput(f"PuLID-FLUX reads photos through {FOLDER_HELP}: {folder} has no {' or '.join(names)}")


def check_encoder_folder(folder: str | None) -> None:
    """The folder holds both encoders' files in their published layouts (their names and shapes: no
    weights read), or BadInput / UnsupportedModel in one line."""
    from ray_faceid.face.eva_clip import load_eva_clip
    from ray_faceid.face.face_parsing import load_face_parsing

    if not folder:
        raise BadInput(f"PuLID-FLUX reads people through {FOLDER_HELP}: set image_encoder to it")
    load_eva_clip(_one_of(folder, EVA_NAMES), meta=True)
    load_face_parsing(_one_of(folder, PARSER_NAMES), meta=True)


def check_face_stack(face) -> None:
    """A face stack (FaceConfig) PuLID-FLUX can read people with: an ArcFace embedding and the five
    points it aligns by, or BadInput naming the setting."""
    if face.backend == "dlib" and not face.recognizer_onnx:
        raise BadInput("face: PuLID-FLUX reads people's ArcFace embedding (antelopev2's pack): set face.backend "
                       "insightface and face.insightface_root")
    if face.backend == "dlib" and face.landmarks != "dlib68":
        raise BadInput("face: PuLID-FLUX aligns faces by their eyes, nose and mouth corners, which dlib's 5 points lack: "
                       "set face.landmarks dlib68, or face.backend insightface")


class PulidFaceReader:
    def __init__(self, folder: str, analyzer, device="cpu", dtype: torch.dtype = torch.float32):
        from ray_faceid.face.eva_clip import load_eva_clip
        from ray_faceid.face.face_parsing import load_face_parsing
        from ray_faceid.weights_hash import weights_hash_of

        eva_file, parser_file = _one_of(folder, EVA_NAMES), _one_of(folder, PARSER_NAMES)
        recogniser = analyzer.spec.version if analyzer is not None else ""
        if analyzer is not None and not recogniser.startswith(ANTELOPE_RECOGNISER):
            log.warning("PuLID-FLUX was trained on antelopev2's ArcFace (%s); this face stack's recogniser is %s: the "
                        "tokens will be off unless it is the same network", ANTELOPE_RECOGNISER, recogniser)
        self.analyzer, self.device, self.dtype = analyzer, torch.device(device), dtype
        eva, parser = load_eva_clip(eva_file), load_face_parsing(parser_file)
        self.sha256 = weights_hash_of(torch.nn.ModuleList([eva, parser]))  # of the files' weights, before any cast
        self.eva = eva.to(self.device, dtype)
        self.parser = parser.to(self.device)  # fp32: its classes, not its scores, are read

    @torch.no_grad()
    def read(self, photos: list[np.ndarray], labels: list[str]) -> PulidFeatures:
        """Each photo's face (RGB uint8 arrays; `labels` name them in errors; several people: refused)."""
        arcface, eva, hidden = [], [], []
        for photo, label in zip(photos, labels):
            a, e, h = self._read_one(photo, label)
            arcface.append(a)
            eva.append(e)
            hidden.append(h)
        return PulidFeatures(torch.cat(arcface), torch.cat(eva), [torch.cat(level) for level in zip(*hidden)])

    def _read_one(self, photo: np.ndarray, label: str):
        from ray_faceid.face import eva_clip, face_parsing
        from ray_faceid.identity.instantid import FIVE_POINTS
        from ray_faceid.pipelines.references import the_face

        photo = shrink_long_edge(photo, LONG_EDGE)  # as PuLID's app does; a phone photo warped whole would alias
        face = the_face(self.analyzer.analyze(photo), label)
        try:
            points = np.stack([face.landmarks.point(name) for name in FIVE_POINTS]).astype(np.float32)
        except KeyError:
            raise BadInput("PuLID-FLUX aligns faces by their eyes, nose and mouth corners: use a face stack whose "
                           "landmarks have them (insightface's pack, --insightface-root)") from None
        aligned = torch.from_numpy(align_ffhq(photo, points)).permute(2, 0, 1)[None].to(self.device).float() / 255
        classes = self.parser(_normalised(aligned, face_parsing.MEAN, face_parsing.STD)).argmax(1, keepdim=True)
        outside = torch.isin(classes, torch.tensor(face_parsing.NOT_FACE, device=self.device))
        grey = (0.299 * aligned[:, :1] + 0.587 * aligned[:, 1:2] + 0.114 * aligned[:, 2:3]).expand(-1, 3, -1, -1)
        face_only = torch.where(outside, torch.ones_like(aligned), grey)
        size = self.eva.image_size
        resized = F.interpolate(face_only, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        embedding, hidden = self.eva(_normalised(resized, eva_clip.MEAN, eva_clip.STD).to(self.dtype))
        arcface = torch.from_numpy(np.asarray(face.embedding, np.float32))[None].to(self.device)
        return arcface, embedding.float(), [h.float() for h in hidden]


def _normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, 3, 1, 1)
    return (images - torch.tensor(mean, device=images.device).view(shape)) / torch.tensor(std, device=images.device
                                                                                              ).view(shape)


def _opencv():
    try:
        import cv2
    except ImportError:
        raise BackendUnavailable("PuLID-FLUX reads photos with OpenCV: pip install 'ray_faceid[insightface]'") from None
    return cv2


def shrink_long_edge(photo: np.ndarray, edge: int) -> np.ndarray:
    """The photo with its long edge at most `edge` (Lanczos, sides rounded down, as PuLID's
    resize_numpy_image_long); a smaller photo as it is."""
    height, width = photo.shape[:2]
    if max(height, width) <= edge:
        return photo
    cv2, scale = _opencv(), edge / max(height, width)
    return cv2.resize(photo, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_LANCZOS4)


def align_ffhq(photo: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 512 x 512 crop whose five points sit on FFHQ's template: a rotation, uniform scale and shift
    fitted by least median of squares (as facexlib fits it), grey where the photo ends."""
    cv2 = _opencv()
    matrix = cv2.estimateAffinePartial2D(points, FFHQ_FIVE, method=cv2.LMEDS)[0]
    if matrix is None:
        raise BadInput("the face's five points do not fit a face's shape: give a clearer photo")
    return cv2.warpAffine(photo, matrix, (ALIGNED, ALIGNED), borderMode=cv2.BORDER_CONSTANT, borderValue=OUTSIDE)
