"""Task unaligned_face (diffbir.faces): alignment to the FFHQ template, paste-back, detection with
the MTCNN facenet-pytorch ships, and the whole path through RestorationPipeline, the CLI and the
HTTP API, on scikit-image's astronaut (a real photo of a real face)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from skimage import data

from diffbir.checkpoints.io import CheckpointError
from diffbir.cli import main as cli_main
from diffbir.faces import (
    FACE_SIZE,
    FFHQ_TEMPLATE,
    FaceConfig,
    FaceTools,
    align_matrix,
    check_landmarks,
    paste_face,
    warp_face,
)
from diffbir.image_io import read_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from serving.config import ServeConfig
from serving.limits import ApiError, check_work, restore_options

from conftest import TINY_FILES

# the astronaut's five points (input pixels), annotated by hand: eyes, nose tip, mouth corners
ASTRONAUT = np.array([[205, 102], [247, 104], [225, 129], [202, 140], [245, 142]], np.float32)
MAX_TILT_DEG = 3.0  # the aligned eye line's tilt
MAX_EYE_ERROR = 8.0  # aligned eyes from the template's, in 512² pixels (the template's eyes are 126 apart)
FAST = dict(steps=1, min_side=64, cfg_scale=1.0)


def astronaut() -> np.ndarray:
    return data.astronaut().astype(np.float32) / 255


def rotate(image: np.ndarray, points: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """`image` rotated about the face's centre, and `points` with it."""
    m = cv2.getRotationMatrix2D(tuple(map(float, points.mean(0))), degrees, 1.0)
    h, w = image.shape[:2]
    turned = cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return turned, np.concatenate([points, np.ones((5, 1), np.float32)], 1) @ m.T


def tilt(points: np.ndarray) -> float:
    dx, dy = points[1] - points[0]
    return abs(np.degrees(np.arctan2(dy, dx)))


@pytest.fixture(scope="module")
def tools() -> FaceTools:
    pytest.importorskip("facenet_pytorch")
    return FaceTools(FaceConfig(detector="mtcnn"))


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return RestorationPipeline(tiny_bundle)


def assert_upright_and_centred(points: np.ndarray) -> None:
    assert tilt(points) < MAX_TILT_DEG, points
    assert np.abs(points[:2] - FFHQ_TEMPLATE[:2]).max() < MAX_EYE_ERROR, points - FFHQ_TEMPLATE


@pytest.mark.parametrize("degrees", [0, 30])
def test_given_landmarks_align_the_face_upright_and_centred(tools, degrees):
    image, points = rotate(astronaut(), ASTRONAUT, degrees)
    matrix = align_matrix(points)
    moved = np.concatenate([points, np.ones((5, 1))], 1) @ matrix.T
    assert_upright_and_centred(moved)
    crop = warp_face(image, matrix)
    assert crop.shape == (FACE_SIZE, FACE_SIZE, 3)
    seen = tools.detect(crop, 5, 16)  # the crop's content, not just the arithmetic, is aligned
    assert len(seen) == 1
    assert_upright_and_centred(seen[0])


@pytest.mark.parametrize("degrees", [0, 30])
def test_mtcnn_finds_the_face_and_aligns_it(tools, degrees):
    image, points = rotate(astronaut(), ASTRONAUT, degrees)
    (found,) = tools.detect(image, 5, 16)
    assert np.abs(found - points).max() < 6  # within a few pixels of the hand annotation
    seen = tools.detect(warp_face(image, align_matrix(found)), 5, 16)
    assert len(seen) == 1
    assert_upright_and_centred(seen[0])


def test_pasting_back_an_identity_restoration_reproduces_the_input():
    image = astronaut()
    matrix = align_matrix(ASTRONAUT)
    crop = warp_face(image, matrix)
    out = paste_face(image, crop, matrix)
    face = (slice(80, 170), slice(185, 265))  # around the eyes, nose and mouth
    assert np.abs(out[face] - image[face]).mean() < 0.02  # two bilinear resamplings
    untouched = np.ones(image.shape[:2], bool)
    untouched[20:240, 120:330] = False  # the aligned square's box
    assert np.array_equal(out[untouched], image[untouched])
    # a different face replaces the inside, and the seam is feathered
    black = paste_face(image, np.zeros_like(crop), matrix)
    assert black[face].max() < 0.02
    row = black[125, 100:260, 0]  # from outside to inside the face
    assert 0.02 < row.min() or np.any((row > 0.02) & (row < image[125, 100:260, 0] - 0.02))


def test_faces_cut_by_the_border_and_outside_landmarks():
    image = astronaut()[:, 215:]  # the left eye lies 10 px outside the image
    points = ASTRONAUT - np.array([215, 0], np.float32)
    checked = check_landmarks(points[None], *image.shape[:2])
    matrix = align_matrix(checked[0])
    crop = warp_face(image, matrix)
    assert np.allclose(crop[256, 5], [135 / 255, 133 / 255, 132 / 255], atol=1e-3)  # outside: facexlib's gray
    out = paste_face(image, crop, matrix)
    assert out.shape == image.shape and np.abs(out[80:170, :50] - image[80:170, :50]).mean() < 0.02


@pytest.mark.parametrize(
    "landmarks,message",
    [
        ([[[1, 2]] * 4], "shape"),
        ([[[1, 2], [3, 4], [5, 6], [7, 8], [9, float("nan")]]], "finite"),
        ([[[1, 2], [30, 4], [5, 6], [7, 8], [9, 5000]]], "far outside"),
        ([[[1, 2]] * 5], "eyes"),
    ],
)
def test_bad_landmarks_are_refused_clearly(landmarks, message):
    with pytest.raises(ValueError, match=message):
        check_landmarks(landmarks, 512, 512)


def test_landmark_options_parse_json_and_are_limited():
    opts = RestoreOptions(task="unaligned_face", landmarks=json.dumps([ASTRONAUT.tolist()]))
    assert np.allclose(opts.landmarks, [ASTRONAUT])
    for bad in (dict(landmarks="[[1, 2"), dict(landmarks=[ASTRONAUT.tolist()] * 3, max_faces=2)):
        with pytest.raises(ValidationError, match="landmarks"):
            RestoreOptions(task="unaligned_face", **bad)
    with pytest.raises(ValidationError, match="only task unaligned_face"):
        RestoreOptions(task="sr", landmarks=[ASTRONAUT.tolist()])
    with pytest.raises(ValidationError, match="max_faces"):
        RestoreOptions(task="unaligned_face", max_faces=100_000)
    with pytest.raises(ValidationError, match="max_faces"):  # the server's own cap is bounded too
        ServeConfig(max_faces=100_000)


def two_faces() -> tuple[np.ndarray, np.ndarray]:
    """A composed picture: the astronaut's head and a mirrored, 20° turned copy side by side; their
    landmarks (image-left eye first)."""
    head = astronaut()[20:276, 100:356]
    left = ASTRONAUT - np.array([100, 20], np.float32)
    mirrored = left.copy()
    mirrored[:, 0] = 255 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # the mirror swaps left and right
    turned, mirrored = rotate(np.ascontiguousarray(head[:, ::-1]), mirrored, 20)
    return np.concatenate([head, turned], 1), np.stack([left, mirrored + np.array([256, 0], np.float32)])


def test_mtcnn_finds_both_faces_of_a_composed_picture_and_skips_small_ones(tools):
    image, points = two_faces()
    found = tools.detect(image, 5, 16)
    assert len(found) == 2
    order = np.argsort(found[:, 0, 0])
    assert np.abs(found[order] - points).max() < 8
    assert len(tools.detect(image, 5, 1)) == 1  # max_faces: the largest
    assert len(tools.detect(image, 100, 16)) == 0  # eyes under 100 px apart: too small


def test_no_face_is_background_only(tools):
    cat = data.chelsea().astype(np.float32) / 255  # a cat: no human face
    assert len(tools.detect(cat, 5, 16)) == 0


class Recorder:
    """The face pipeline, recording what it is asked to restore and what it gives back."""

    def __init__(self, pipeline: RestorationPipeline):
        self.pipeline, self.calls = pipeline, []

    def __call__(self, crops, opts, seeds, progress=None, captions=None):
        out = self.pipeline(crops, opts, seeds, progress, captions)
        self.calls.append((crops, opts, seeds, out))
        return out


def test_unaligned_face_restores_each_face_with_the_face_path_and_the_rest_as_background(pipe, tools):
    """End to end on the tiny model: the output is the general path's background with every face
    restored (together, as task `face` at 512², seed + 1 + k) and pasted back; no face: the background."""
    image, _ = two_faces()
    opts = RestoreOptions(task="unaligned_face", seed=7, **FAST)
    pipe.face_pipeline = recorder = Recorder(pipe)
    try:
        (out,) = pipe([image], opts)
        cat = data.chelsea()[:200, :300].astype(np.float32) / 255  # a cat: no human face
        (alone,) = pipe([cat], opts)
    finally:
        pipe.face_pipeline = pipe
    (crops, face_opts, seeds, faces), *more = recorder.calls
    assert not more and len(faces) == 2  # both faces, one call, nothing for the cat
    assert (face_opts.task, face_opts.scale, face_opts.min_side, seeds) == ("face", 1.0, FACE_SIZE, [8, 9])
    found = tools.detect(image, opts.min_face_size, opts.max_faces)
    matrices = [align_matrix(p) for p in found]
    for crop, matrix in zip(crops, matrices):
        assert np.abs(crop - warp_face(image, matrix)).max() < 1e-3
    (background,) = pipe([image], RestoreOptions(task="sr", upscale=1, seed=7, **FAST))
    expected = background
    for face, matrix in zip(faces, matrices):
        expected = paste_face(expected, face, matrix)
    assert out.shape == image.shape and np.abs(out - expected).max() < 1e-5
    for p in found:  # both faces differ from the background restoration
        x, y = p[2].astype(int)  # the nose
        assert np.abs(out[y - 5 : y + 5, x - 5 : x + 5] - background[y - 5 : y + 5, x - 5 : x + 5]).mean() > 1e-3
    (general,) = pipe([cat], RestoreOptions(task="sr", upscale=1, seed=7, **FAST))
    assert np.array_equal(alone, general)


def test_the_api_reads_landmarks_and_limits_faces():
    """What the HTTP API does with a request's fields before any work (serving.limits)."""
    with pytest.raises(ValidationError, match="defaults.max_faces"):
        ServeConfig(max_faces=4)
    cfg = ServeConfig(max_faces=4, defaults={"max_faces": 4})
    fields = {"task": "unaligned_face", "landmarks": json.dumps([ASTRONAUT.tolist()])}
    check_work(512, 512, restore_options(fields, cfg.defaults), cfg)  # max_faces: the server's
    with pytest.raises(ApiError) as e:
        check_work(100, 100, restore_options(fields, cfg.defaults), cfg)  # the points lie outside a 100² image
    assert e.value.status == 422 and e.value.errors[0]["field"] == "landmarks"
    with pytest.raises(ApiError) as e:
        check_work(512, 512, restore_options({**fields, "max_faces": "5"}, {}), cfg)
    assert e.value.errors[0]["field"] == "max_faces"
    with pytest.raises(ApiError) as e:
        restore_options({**fields, "landmarks": "[[1, 2]"}, {})
    assert e.value.status == 422 and e.value.errors[0]["field"] == "landmarks"


def test_retinaface_and_parser_load_from_local_files(tmp_path):
    """facexlib's nets built here and loaded from local files (random weights: the path is tested)."""
    pytest.importorskip("facexlib")
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.parsenet import ParseNet

    torch.manual_seed(0)
    net = RetinaFace(network_name="mobile0.25", device="cpu")
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "det.pth")
    parser = ParseNet(in_size=FACE_SIZE, out_size=FACE_SIZE, parsing_ch=19)
    torch.save(parser.state_dict(), tmp_path / "parse.pth")
    cfg = FaceConfig(
        detector="retinaface",
        retinaface_weights=str(tmp_path / "det.pth"),
        retinaface_network="mobile0.25",
        parser_weights=str(tmp_path / "parse.pth"),
        threshold=0.0,
    )
    face_tools = FaceTools(cfg)
    found = face_tools.detect(astronaut()[:200, 100:350], 0, 4)
    assert found.ndim == 3 and found.shape[1:] == (5, 2) and len(found) <= 4
    (mask,) = face_tools.parse_masks([warp_face(astronaut(), align_matrix(ASTRONAUT))])
    assert mask.shape == (FACE_SIZE, FACE_SIZE) and 0 <= mask.min() and mask.max() <= 1
    assert mask[:10].max() == 0  # no border
    with pytest.raises(ValueError, match="retinaface_weights"):
        _ = FaceTools(FaceConfig(detector="retinaface")).detector


def test_a_face_model_restores_the_faces_under_the_same_controlnet(tiny_bundle, golden_weights):
    pipeline = RestorationPipeline(tiny_bundle)
    assert pipeline.face_pipeline is pipeline
    pipeline.configure_faces(FaceConfig(face_model=[str(golden_weights / "swinir_tiny.safetensors")]))
    faces = pipeline.face_pipeline
    assert faces is not pipeline and faces.stage1 is not pipeline.stage1
    assert faces.cldm.unet is pipeline.cldm.unet and faces.cldm.controlnet is pipeline.cldm.controlnet
    with pytest.raises(CheckpointError, match="no such file"):
        pipeline.configure_faces(FaceConfig(face_model=[str(golden_weights / "missing.ckpt")]))


def test_restore_cli_with_landmarks_file(golden_weights, tiny_configs, tmp_path):
    photo = data.astronaut()[40:232, 120:312]  # the head, 192²
    Image.fromarray(photo).save(tmp_path / "a.png")
    (tmp_path / "faces.json").write_text(json.dumps([(ASTRONAUT - [120, 40]).tolist()]))
    heads = str(tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"])
    argv = ["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--num-head-channels", heads]
    argv += ["--task", "unaligned_face", "--landmarks-file", str(tmp_path / "faces.json")]
    argv += ["--steps", "1", "--min-side", "64", "--cfg-scale", "1"]
    for name in TINY_FILES:
        argv += ["-m", str(golden_weights / name)]
    assert cli_main(argv) == 0
    out, _ = read_image(tmp_path / "out" / "a.png")
    assert out.shape == (192, 192, 3)
    (tmp_path / "faces.json").write_text(json.dumps([[[1, 2]] * 4]))
    assert cli_main([*argv, "--overwrite"]) == 2  # a clear error, not a traceback
