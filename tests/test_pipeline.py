"""RestorationPipeline and `diffbir restore` on the tiny reference weights and real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from diffbir.checkpoints.loading import load_model
from diffbir.cli import main as cli_main
from diffbir.colorfix import wavelet_reconstruction
from diffbir.image_io import read_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions, plan_sizes
from diffbir.utils.keyed_init import keyed_state_dict

from conftest import MANIFESTS, TINY_FILES

FAST = dict(steps=2, min_side=64, cfg_scale=1.0)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return RestorationPipeline(tiny_bundle)


def test_plan_sizes_follow_the_paper():
    assert plan_sizes(100, 150, 4, 512) == ((400, 600), (512, 768))  # short side < 512: work at 512
    assert plan_sizes(600, 800, 1, 512) == ((600, 800), (600, 800))


@pytest.mark.parametrize("task,upscale", [("sr", 2.0), ("face", None), ("denoise", None)])
def test_every_task_gives_the_right_size(pipe, task, upscale):
    img = data.astronaut()[:48, :80].astype(np.float32) / 255
    (out,) = pipe([img], RestoreOptions(task=task, upscale=upscale, **FAST))
    scale = upscale or 1
    assert out.shape == (round(48 * scale), round(80 * scale), 3)
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_batches_are_independent_of_their_mates_and_deterministic(pipe):
    a = data.astronaut()[:64, :64].astype(np.float32) / 255
    b = data.chelsea()[:64, :64].astype(np.float32) / 255
    opts = RestoreOptions(task="denoise", sampler="euler_ancestral", **FAST)
    alone = pipe([a], opts, seeds=[7])[0]
    together = pipe([a, b], opts, seeds=[7, 8])
    # same seed, same result, whoever shares the batch (up to batched-kernel float differences)
    assert np.abs(alone - together[0]).max() < 1e-4
    mixed = pipe([a, data.chelsea()[:40, :96].astype(np.float32) / 255], opts)  # padded to a common size
    assert mixed[1].shape == (40, 96, 3)
    assert np.array_equal(alone, pipe([a], opts, seeds=[7])[0])
    assert not np.array_equal(alone, pipe([a], opts, seeds=[9])[0])


def test_colour_fix_follows_the_official_order(pipe, monkeypatch):
    """The official order: crop the decoded canvas to the working size, wavelet fix against the
    (unpadded) stage-1 image with no clamp before it, resize to the output, then clamp."""
    img = data.astronaut()[:50, :70].astype(np.float32) / 255
    opts = RestoreOptions(task="denoise", **FAST)
    size, work = plan_sizes(50, 70, 1.0, 64)
    assert work != (64, 128)  # the canvas is padded: the crop matters
    decoded = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(0)) * 2 - 0.5  # out of [0, 1]
    monkeypatch.setattr(pipe, "_diffuse", lambda clean, opts, seeds, *_: decoded)
    (out,) = pipe([img], opts)
    stage1 = pipe.run_stage1(torch.from_numpy(img).permute(2, 0, 1)[None], work, opts)
    fixed = wavelet_reconstruction(decoded[..., : work[0], : work[1]], stage1)
    expected = F.interpolate(fixed, size=size, mode="bicubic", antialias=True).clamp(0, 1)[0].permute(1, 2, 0)
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_scale_one_stage1_nets_run_before_the_resize(golden_weights, tiny_configs, tmp_path):
    """SCUNet (scale 1) cleans the input at its own size, then the result is resized to the working
    size (the official SCUNet pipeline); the DiffBIR SwinIR variant is fed the resized input."""
    shapes = json.loads((MANIFESTS / "scunet_color_real_psnr.json").read_text())["keys"]
    torch.save(keyed_state_dict({k: v["shape"] for k, v in shapes.items()}, salt=0), tmp_path / "scunet.pth")
    heads = tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"]
    files = [golden_weights / name for name in TINY_FILES[:2]] + [tmp_path / "scunet.pth"]
    scunet = RestorationPipeline(load_model(files, num_head_channels=heads))
    assert not scunet.stage1_resizes_first
    lq = torch.from_numpy(data.astronaut()[:48, :80].astype(np.float32) / 255).permute(2, 0, 1)[None]
    work = plan_sizes(48, 80, 1.0, 64)[1]
    with torch.no_grad():
        cleaned_first = F.interpolate(scunet.stage1(lq), size=work, mode="bicubic", antialias=True)
        resized_first = scunet.stage1(F.interpolate(lq, size=work, mode="bicubic", antialias=True))
    out = scunet.run_stage1(lq, work, RestoreOptions(task="denoise", **FAST))
    torch.testing.assert_close(out, cleaned_first, atol=1e-5, rtol=0)
    assert (out - resized_first).abs().max() > 1e-3


def test_restore_grouped_matches_each_image_alone_in_input_order(pipe):
    images = [
        data.astronaut()[:64, :64].astype(np.float32) / 255,
        data.chelsea()[:40, :96].astype(np.float32) / 255,  # another canvas (64x192)
        data.coffee()[:64, :64].astype(np.float32) / 255,
    ]
    options = [RestoreOptions(task="denoise", sampler="euler_ancestral", seed=seed, **FAST) for seed in (1, 2, 3)]
    assert pipe.canvas_groups(images, options) == [[0, 2], [1]]
    together = pipe.restore_grouped(images, options)
    for image, opts, out in zip(images, options, together):
        alone = pipe([image], opts, [opts.seed])[0]
        assert out.shape == alone.shape and np.abs(out - alone).max() < 1e-4  # batched-kernel float noise at most


class RecordingPipeline(RestorationPipeline):
    """A RestorationPipeline without models: records each call, returns images filled with their seed."""

    def __init__(self, fail_task: str | None = None):
        self.calls: list[tuple[list[tuple], RestoreOptions, list[int]]] = []
        self.fail_task = fail_task
        self.captioner = None

    def __call__(self, images, opts, seeds, progress=None, captions=None):
        self.calls.append(([im.shape for im in images], opts, list(seeds)))
        if opts.task == self.fail_task:
            raise RuntimeError("out of memory")
        return [np.full(im.shape, seed, np.float32) for im, seed in zip(images, seeds)]


def restore_recorded(pipe: RecordingPipeline, jobs: list[tuple[int, int, dict]]) -> list[np.ndarray | Exception]:
    """restore_grouped of zero images (h, w) with these options."""
    images = [np.zeros((h, w, 3), np.float32) for h, w, _ in jobs]
    return pipe.restore_grouped(images, [RestoreOptions(**FAST | opts) for _, _, opts in jobs])


def test_restore_grouped_groups_by_options_and_canvas():
    pipe = RecordingPipeline()
    results = restore_recorded(
        pipe,
        [
            (100, 100, dict(seed=1, task="denoise")),
            (64, 64, dict(seed=2, task="sr", upscale=2)),
            (128, 120, dict(seed=3, task="denoise")),  # other size, same 128x128 canvas as image 0
            (100, 100, dict(seed=4, task="denoise", guidance_scale=0.5)),  # other options
            (64, 100, dict(seed=5, task="denoise")),  # other canvas (64x128)
            (64, 64, dict(seed=6, task="sr", upscale=2)),
        ],
    )
    assert [r[0, 0, 0] for r in results] == [1, 2, 3, 4, 5, 6]  # each image gets its own result, in order
    groups = sorted((seeds, opts.task, opts.guidance_scale) for _, opts, seeds in pipe.calls)
    assert groups == [([1, 3], "denoise", 0.0), ([2, 6], "sr", 0.0), ([4], "denoise", 0.5), ([5], "denoise", 0.0)]


def test_a_failing_group_leaves_the_others():
    jobs = [
        (64, 64, dict(seed=1, task="denoise")),
        (64, 64, dict(seed=2, task="face")),
        (64, 64, dict(seed=3, task="face")),
    ]
    results = restore_recorded(RecordingPipeline(fail_task="face"), jobs)
    assert results[0][0, 0, 0] == 1
    assert all(isinstance(r, RuntimeError) for r in results[1:])


@pytest.mark.parametrize("space", ["rgb", "latent"])
def test_guidance_and_tiling_run_together(pipe, space):
    img = data.coffee()[:64, :160].astype(np.float32) / 255
    opts = RestoreOptions(
        task="denoise", guidance_scale=0.05, guidance_space=space, tiled=True, tile_size=64, tile_stride=32, **FAST
    )
    (out,) = pipe([img], opts)
    assert out.shape == img.shape and np.isfinite(out).all()


def test_restore_cli_folders_resume_and_bad_files(golden_weights, tiny_configs, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(data.astronaut()[:64, :96]).save(src / "a.png")
    Image.fromarray(data.camera()[:48, :64]).save(src / "sub" / "gray.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    weights = golden_weights
    model = [
        str(weights / n) for n in ("sd21_tiny.safetensors", "ircontrolnet_tiny.safetensors", "swinir_tiny.safetensors")
    ]
    heads = str(tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"])
    argv = [
        "restore",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--num-head-channels",
        heads,
        "--task",
        "sr",
        "--upscale",
        "2",
        "--steps",
        "2",
        "--min-side",
        "64",
        "--cfg-scale",
        "1",
    ]
    for m in model:
        argv += ["-m", m]
    assert cli_main(argv) == 1  # one unreadable file: reported, the rest restored
    err = capsys.readouterr().err
    assert "broken.png" in err
    out_a, info = read_image(tmp_path / "out" / "a.png")
    assert out_a.shape == (128, 192, 3)
    gray, ginfo = read_image(tmp_path / "out" / "sub" / "gray.jpg")
    assert ginfo.gray and gray.shape == (96, 128, 3)
    before = (tmp_path / "out" / "a.png").stat().st_mtime_ns
    assert cli_main(argv) == 1  # resumable: finished outputs are skipped
    assert (tmp_path / "out" / "a.png").stat().st_mtime_ns == before
    assert "skipping 2 outputs" in capsys.readouterr().out
