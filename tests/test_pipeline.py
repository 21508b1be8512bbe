"""RestorationPipeline and `diffbir restore` on the tiny reference weights and real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from diffbir.cli import main as cli_main
from diffbir.image_io import read_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions, plan_sizes

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

    def __call__(self, images, opts, seeds):
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
