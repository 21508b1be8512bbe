"""Faces in the wild (task `unaligned_face`): detect five landmarks per face, align each face to the
512² FFHQ template, and paste restored faces back under a feathered mask.

This follows the official v2.1 inference (`unaligned_bfr_loop.py` with facexlib's FaceRestoreHelper):
faces are found on the input upscaled bicubically to the output size (short side raised to
`detect_side` for the detector only), each warped by the similarity transform that maps its five
landmarks (eyes, nose, mouth corners, image-left first) onto facexlib's template (estimated with
cv2.estimateAffinePartial2D and LMEDS), and pasted back by the inverse warp under facexlib's soft
square mask (eroded by 2 px, then by 1/10 of the face's side and blurred as much), optionally
narrowed by a face-parsing mask. RestorationPipeline restores the crops and the background.

Detectors: facenet-pytorch's MTCNN, whose weights ship in its wheel, and facexlib's RetinaFace,
built here and loaded from a local file (facexlib's own init functions download). Both are
optional installs; landmarks given by the caller need neither.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

FACE_SIZE = 512
# facexlib's five points of an FFHQ face at 512²: left eye, right eye, nose, mouth left, mouth right
FFHQ_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
BORDER_GRAY = (135 / 255, 133 / 255, 132 / 255)  # facexlib's fill outside the image
# ParseNet's 19 classes kept as face (facexlib's MASK_COLORMAP: not background, neck, cloth, hair, hat)
PARSE_FACE_CLASSES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15]
# how far outside the image a given landmark may lie, as a share of its side (faces cut by the border)
LANDMARK_MARGIN = 0.5


class FaceConfig(BaseModel):
    """Where the face tools come from: the detector, its weights, the optional parser and face model.
    Loaded once per pipeline; the per-image choices (landmarks, max_faces, min_face_size) are
    RestoreOptions."""

    model_config = ConfigDict(extra="forbid")

    detector: Literal["auto", "mtcnn", "retinaface"] = Field(
        "auto", description="auto: MTCNN when facenet-pytorch is installed, else RetinaFace"
    )
    retinaface_weights: str | None = Field(
        None, description="facexlib's detection_Resnet50_Final.pth (or the mobile0.25 file), a local path"
    )
    retinaface_network: Literal["resnet50", "mobile0.25"] = "resnet50"
    parser_weights: str | None = Field(
        None, description="facexlib's parsing_parsenet.pth, a local path: a face-parsing paste mask (None: square)"
    )
    face_model: list[str] | None = Field(
        None,
        description="stage-1 file for the faces (face_swinir_v1.ckpt, as the official; None: the model's own)",
    )
    threshold: float = Field(0.8, ge=0, le=1, description="lowest detection score kept")
    detect_side: int = Field(640, ge=64, le=4096, description="the detector sees the short side raised to this")
    batch_size: int = Field(8, ge=1, le=64, description="faces restored in one model call")

    def absolute(self) -> FaceConfig:
        """Its local paths made absolute (for processes started elsewhere: Ray actors)."""
        absolute = lambda p: p and str(Path(p).resolve())  # noqa: E731
        return self.model_copy(
            update=dict(
                retinaface_weights=absolute(self.retinaface_weights),
                parser_weights=absolute(self.parser_weights),
                face_model=self.face_model and [absolute(p) for p in self.face_model],
            )
        )


class FaceDetector(Protocol):
    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB float (H, W, 3) in [0, 1] -> landmarks (N, 5, 2) in its pixels, scores (N,)."""


class MTCNNDetector:
    """facenet-pytorch's MTCNN with the P/R/O-Net weights its wheel ships."""

    def __init__(self, cfg: FaceConfig, device: torch.device):
        from facenet_pytorch import MTCNN

        self.net = MTCNN(keep_all=True, device=device)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, scores, points = self.net.detect(_uint8(image), landmarks=True)
        if points is None:
            return np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        return np.asarray(points, np.float32), np.asarray(scores, np.float32)


class RetinaFaceDetector:
    """facexlib's RetinaFace (what the official inference uses), weights from a local file."""

    def __init__(self, cfg: FaceConfig, device: torch.device):
        from facexlib.detection.retinaface import RetinaFace

        if cfg.retinaface_weights is None:
            raise ValueError("faces.retinaface_weights: the RetinaFace detector needs its weights file")
        self.net = RetinaFace(network_name=cfg.retinaface_network, half=False, device=device)
        state = torch.load(cfg.retinaface_weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        self.net.load_state_dict(state, strict=True)
        self.net.eval()
        self.threshold = cfg.threshold

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bgr = np.ascontiguousarray(image[..., ::-1] * 255, dtype=np.float32)
        found = self.net.detect_faces(bgr, conf_threshold=self.threshold)
        if found is None or len(found) == 0:
            return np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
        return found[:, 5:15].reshape(-1, 5, 2).astype(np.float32), found[:, 4].astype(np.float32)


DETECTORS: dict[str, type] = {"mtcnn": MTCNNDetector, "retinaface": RetinaFaceDetector}


def detector_name(cfg: FaceConfig) -> str:
    if cfg.detector != "auto":
        return cfg.detector
    return "mtcnn" if importlib.util.find_spec("facenet_pytorch") else "retinaface"


class FaceTools:
    """A pipeline's detector and parser, each built on first use: landmarks given by the caller
    need no detector, and a square mask no parser."""

    def __init__(self, cfg: FaceConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)

    @cached_property
    def detector(self) -> FaceDetector:
        name = detector_name(self.cfg)
        try:
            return DETECTORS[name](self.cfg, self.device)
        except ImportError as e:
            package = {"mtcnn": "facenet-pytorch", "retinaface": "facexlib"}[name]
            raise ValueError(f"face detector {name} needs {package} installed (or give landmarks)") from e

    @cached_property
    def parser(self) -> torch.nn.Module | None:
        if self.cfg.parser_weights is None:
            return None
        from facexlib.parsing.parsenet import ParseNet

        net = ParseNet(in_size=FACE_SIZE, out_size=FACE_SIZE, parsing_ch=19)
        net.load_state_dict(torch.load(self.cfg.parser_weights, map_location="cpu", weights_only=True), strict=True)
        return net.eval().to(self.device)

    def detect(self, image: np.ndarray, min_eye_distance: float, max_faces: int) -> np.ndarray:
        """Landmarks (N, 5, 2) of the faces in `image` (its pixels): scored at least the threshold,
        eyes at least `min_eye_distance` apart, the `max_faces` largest."""
        h, w = image.shape[:2]
        scale = max(1.0, self.cfg.detect_side / min(h, w))  # upscaled only, as the official
        seen = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
        points, scores = self.detector(np.clip(seen, 0, 1))
        points = points[scores >= self.cfg.threshold] / scale
        eyes = eye_distance(points)
        keep = np.argsort(-eyes, kind="stable")[: max(0, max_faces)]
        return points[keep[eyes[keep] >= min_eye_distance]]

    @torch.no_grad()
    def parse_masks(self, faces: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """facexlib's parsing paste mask of each restored 512² face (float [0, 1]), or None each
        without a parser."""
        if self.parser is None or not faces:
            return [None] * len(faces)
        x = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).to(self.device).float() * 2 - 1
        labels = self.parser(x)[0].argmax(dim=1).cpu().numpy()
        masks = []
        for label in labels:
            mask = np.isin(label, PARSE_FACE_CLASSES).astype(np.float32) * 255
            mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
            mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0  # no black borders
            masks.append(mask / 255)
        return masks


def eye_distance(landmarks: np.ndarray) -> np.ndarray:
    return np.linalg.norm(landmarks[:, 0] - landmarks[:, 1], axis=-1) if len(landmarks) else np.zeros(0)


def check_landmarks(landmarks: Sequence, height: int, width: int) -> np.ndarray:
    """Landmarks given for a height x width image as a (N, 5, 2) float array, or a ValueError saying
    what is wrong: the shape, a value that is not finite, a point too far outside the image
    (LANDMARK_MARGIN of its side: faces cut by the border are fine), two eyes at one point."""
    try:
        points = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"landmarks: not a list of faces of five [x, y] points ({e})") from e
    if points.ndim != 3 or points.shape[1:] != (5, 2):
        raise ValueError(
            f"landmarks: expected [[x, y] x 5] per face (eyes, nose, mouth corners), got shape {points.shape}"
        )
    if not np.isfinite(points).all():
        raise ValueError("landmarks: every coordinate must be a finite number")
    lo = -LANDMARK_MARGIN * np.array([width, height])
    hi = (1 + LANDMARK_MARGIN) * np.array([width, height])
    bad = np.argwhere(((points < lo) | (points > hi)).any(axis=-1))
    if len(bad):
        face, point = bad[0]
        raise ValueError(
            f"landmarks: face {face} point {point} {points[face, point].tolist()} lies far outside "
            f"the {width}x{height} image (input pixels)"
        )
    small = np.flatnonzero(eye_distance(points) < 1)
    if len(small):
        raise ValueError(f"landmarks: face {small[0]} has its eyes less than a pixel apart")
    return points.astype(np.float32)


def align_matrix(landmarks: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform taking one face's five landmarks onto the template (as facexlib:
    LMEDS, equivalent to skimage's similarity estimate on five points)."""
    matrix = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    if matrix is None:
        raise ValueError(f"landmarks {landmarks.tolist()}: no similarity transform fits them")
    return matrix


def warp_face(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned FACE_SIZE² crop of `image` (float RGB); outside the image is facexlib's gray."""
    return cv2.warpAffine(
        image, matrix, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_GRAY
    )


def paste_face(
    background: np.ndarray, face: np.ndarray, matrix: np.ndarray, parse_mask: np.ndarray | None = None
) -> np.ndarray:
    """`background` with the restored aligned `face` warped back under facexlib's soft mask. Only
    the face's box of the background is touched (facexlib warps over the whole image each time)."""
    h, w = background.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [FACE_SIZE, 0, 1], [0, FACE_SIZE, 1], [FACE_SIZE, FACE_SIZE, 1]]) @ inverse.T
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, [w, h])
    if x1 <= x0 or y1 <= y0:
        return background  # the face lies wholly outside the image
    inverse[:, 2] -= (x0, y0)
    box = (x1 - x0, y1 - y0)
    restored = cv2.warpAffine(face, inverse, box)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, box)
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))  # the warp's dark edge
    restored *= mask[..., None]
    edge = int(math.sqrt(mask.sum())) // 20
    if edge:
        mask = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
        mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0)
    if parse_mask is not None:
        mask = np.minimum(mask, cv2.warpAffine(parse_mask.astype(np.float32), inverse, box))
    out = background.copy()
    region = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = mask[..., None] * restored + (1 - mask[..., None]) * region
    return out


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
