"""The official v2.1 sampling path (diffbir.sampling.edm): fixture i (the reference's EDMSampler; every
case INDEX.json lists, with its own steps and hyper-parameters), the EDM solvers against analytic
denoisers, guidance and tiling with them, presets, and the float32 sampler state under bf16/fp16 weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

import diffbir.pipeline
from diffbir.checkpoints.loading import load_model
from diffbir.checkpoints.platform import read_manifest
from diffbir.cli import main as cli_main
from diffbir.config import DiffusionConfig
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from diffbir.presets import PRESETS
from diffbir.sampling import (
    EDM_SAMPLERS,
    Denoiser,
    EDMOptions,
    NoiseSchedule,
    cfg_model,
    gaussian_noise,
    sample,
    stored_noise,
)
from diffbir.sampling.denoiser import rescaled_cfg_scale
from diffbir.sampling.edm import EDMSchedule
from serving.archive import ArchiveConfig
from serving.limits import restore_options

from conftest import (
    MU,
    ROOT,
    SAMPLING,
    TINY_FILES,
    S,
    analytic_model,
    assert_close_golden,
    gaussian_ode_solution,
    gaussian_posterior_mean,
    load_fixture,
)

V21 = DiffusionConfig.preset("v2.1")  # the path is v2.1's: its sigma_0 = 1e4 stands for the infinite sigma of t = T


def case_config(spec: dict) -> DiffusionConfig:
    """A case's training schedule (INDEX names them as fixture d does: v2, v2_1) and parameterization."""
    return DiffusionConfig.preset(spec["schedule"].replace("_", ".")).model_copy(
        update={"parameterization": spec["parameterization"]}
    )


@pytest.fixture(scope="module")
def fixture_i(golden, fixture_index):
    return load_fixture(golden, "i_edm_sampling"), fixture_index["files"]["i_edm_sampling"]["description"]


# --- fixture i: the reference's EDMSampler ---------------------------------------------------------


def test_fixture_i_schedules(fixture_i):
    i, info = fixture_i
    assert info["cases"]
    for name, spec in info["cases"].items():
        schedule = EDMSchedule.create(NoiseSchedule.from_config(case_config(spec)), spec["steps"])
        assert list(schedule.timesteps) == i[f"{name}.timesteps"].tolist(), name
        # float32 buffers computed in float64 (README §7: schedules, float32 - rtol 1e-6)
        torch.testing.assert_close(torch.tensor(schedule.sigmas), i[f"{name}.sigmas"], rtol=1e-6, atol=0, msg=name)


def test_fixture_i_trajectories(fixture_i, tiny_bundle):
    """Every case: the state each step's first evaluation sees (x.i, after any churn, as k-diffusion's
    callback reports it: the network input / c_in = / sqrt(alpha_bar)), that evaluation's CFG-combined
    D (denoised.i), z_0, and the stored draws consumed in call order, exactly as many as the reference made."""
    i, info = fixture_i
    for name, spec in info["cases"].items():
        model = cfg_model(
            tiny_bundle.cldm,
            i["c_img"],
            i["c_txt_pos"],
            i["c_txt_neg"],
            spec["cfg_scale"],
            info.get("strength", 1.0),
            spec["rescale_cfg"],
        )
        inputs, firsts, step_open, draws = [], [], [True], []
        den = Denoiser(lambda x, t: inputs.append(x) or model(x, t), case_config(spec))

        def hook(x0, step):
            if step_open[0]:  # the step's first evaluation
                firsts.append((inputs[-1] / math.sqrt(step.alpha_bar), x0))
                step_open[0] = False
            return x0

        stored = stored_noise([i[f"{name}.noise.{j}"] for j in range(spec["noise_draws"])])
        z_0 = sample(
            den,
            i["x_T"],
            spec["solver"],
            spec["steps"],
            x0_hook=hook,
            noise=lambda like, j: draws.append(j) or stored(like, j),
            callback=lambda k, x: step_open.__setitem__(0, True),
            edm=EDMOptions(**spec["hparams"]),
        )
        assert draws == list(range(spec["noise_draws"])), name
        assert len(firsts) == spec["steps"], name
        for k, (x, denoised) in enumerate(firsts):
            assert_close_golden(x, i[f"{name}.x.{k}"], **SAMPLING, name=f"{name}.x.{k}")
            assert_close_golden(denoised, i[f"{name}.denoised.{k}"], **SAMPLING, name=f"{name}.denoised.{k}")
        assert_close_golden(z_0, i[f"{name}.z_0"], **SAMPLING, name=f"{name}.z_0")


def test_rescaled_cfg_scale():
    assert rescaled_cfg_scale(6.0, 1000) == 1.0 and rescaled_cfg_scale(6.0, 0) == pytest.approx(7.0)
    assert 1 < rescaled_cfg_scale(6.0, 500) < 7 and rescaled_cfg_scale(1.0, 0) == 1.0


# --- the solvers -----------------------------------------------------------------------------------

STEPS = 6
# draws of a run of STEPS steps: churning solvers draw every step (even with no churn); the ancestral
# and SDE ones none into sigma 0; dpm++_sde two per step (its two Brownian increments)
DRAWS = {
    "edm_euler": STEPS,
    "edm_heun": STEPS,
    "edm_dpm_2": STEPS,
    "edm_euler_a": STEPS - 1,
    "edm_dpm_2_a": STEPS - 1,
    "edm_dpm++_2s_a": STEPS - 1,
    "edm_dpm++_sde": 2 * (STEPS - 1),
    "edm_dpm++_2m_sde": STEPS - 1,
    "edm_dpm++_3m_sde": STEPS - 1,
    "edm_lms": 0,
    "edm_dpm++_2m": 0,
}
ODE = {"edm_euler": EDMOptions(), "edm_heun": EDMOptions(), "edm_dpm_2": EDMOptions(), "edm_dpm++_2m": EDMOptions()}
ODE["edm_lms"] = EDMOptions(order=3)
CHURN = EDMOptions(s_churn=40, s_tmax=math.inf)


def test_every_solver_is_tested():
    assert set(DRAWS) == set(EDM_SAMPLERS)


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
def test_draws_in_call_order(sampler):
    calls = []
    den = Denoiser(lambda x, t: torch.zeros_like(x), V21)
    noise = gaussian_noise(torch.Generator().manual_seed(0))
    sample(den, torch.randn(1, 4, 2, 2), sampler, STEPS, noise=lambda like, j: calls.append(j) or noise(like, j))
    assert calls == list(range(DRAWS[sampler]))


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
def test_point_mass_recovered(sampler):
    """Data = one known latent: every solver lands on it, also when a hook replaces x0 (once per
    network call; its change is applied as a state shift, which lands exactly for every solver at
    its default order - LMS of order 3 extrapolates the shifted trajectory, so it ends near it)."""
    gen = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    model = analytic_model(V21, lambda x_t, ab: x0)
    options = ODE.get(sampler, EDMOptions())
    z = sample(Denoiser(model, V21), x_T, sampler, 10, noise=gaussian_noise(gen), edm=options)
    torch.testing.assert_close(z, x0, rtol=0, atol=2e-4)

    steps, seen_t = [], []
    den = Denoiser(lambda x, t: seen_t.append(float(t)) or model(x, t), V21)
    hook = lambda x0_, step: steps.append(step) or x0_ + 1  # noqa: E731
    z = sample(den, x_T, sampler, 10, noise=gaussian_noise(gen), x0_hook=hook)
    torch.testing.assert_close(z, x0 + 1, rtol=0, atol=2e-4)
    assert [s.t for s in steps] == seen_t and steps[0].t == 999 and steps[-1].x0_coef == 1.0
    assert all(0 <= s.alpha_bar <= 1 and 0 < s.x0_coef <= 1 for s in steps)


@pytest.mark.parametrize("sampler", ODE)
def test_ode_solvers_converge_to_the_exact_solution(sampler):
    """Gaussian data: the deterministic solvers approach the closed-form probability-flow solution,
    about at first order (the first step, from sigma 1e4 to sigma_1, dominates; lms of order 3 beats it)."""
    den = Denoiser(analytic_model(V21, gaussian_posterior_mean), V21)
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = gaussian_ode_solution(x_T, den.schedule.alphas_cumprod[-1].item())
    rms = {n: (sample(den, x_T, sampler, n, edm=ODE[sampler]) - exact).pow(2).mean().sqrt().item() for n in (20, 80)}
    assert rms[80] < 0.05 and rms[80] < rms[20] / 2.5, rms


@pytest.mark.parametrize("sampler,options", [*((s, EDMOptions()) for s in DRAWS if s not in ODE), ("edm_heun", CHURN)])
def test_stochastic_solvers_sample_the_data(sampler, options):
    """Gaussian data: the ancestral, SDE and churning solvers give the data's mean and spread."""
    den = Denoiser(analytic_model(V21, gaussian_posterior_mean), V21)
    gen = torch.Generator().manual_seed(0)
    z = sample(den, torch.randn(1, 4, 64, 64, generator=gen), sampler, 200, noise=gaussian_noise(gen), edm=options)
    assert abs(z.mean().item() - MU) < 0.01
    assert abs(z.std().item() - S) < (0.06 if sampler == "edm_euler_a" else 0.02) * S  # euler_a: first order


# --- in the pipeline: guidance, tiling, presets ----------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return RestorationPipeline(tiny_bundle)


@pytest.mark.parametrize("space", ["rgb", "latent"])
def test_guidance_and_tiling_with_the_v21_sampler(pipe, space):
    """Tiled (2 x 4 latent tiles) v2.1 sampling with restoration guidance ends nearer the stage-1 image."""
    img = data.coffee()[:64, :160].astype(np.float32) / 255
    base = dict(task="denoise", preset="v2.1", steps=4, cfg_scale=1.0, min_side=64, color_fix="none")
    base |= dict(tiled=True, tile_size=64, tile_stride=32, guidance_space=space)
    target = pipe.stage1_image(img, RestoreOptions(**base))
    mse = {
        g: float(((pipe([img], RestoreOptions(**base, guidance_scale=g))[0] - target) ** 2).mean()) for g in (0, 0.5)
    }
    assert mse[0.5] < 0.95 * mse[0], mse


def test_presets_fill_only_what_is_not_given():
    opts = RestoreOptions(preset="v2.1", steps=25, prompt="a cat")
    assert (opts.steps, opts.prompt) == (25, "a cat")  # explicit fields win
    assert all(getattr(opts, k) == v for k, v in PRESETS["v2.1"].items() if k not in ("steps", "prompt"))
    assert (opts.sampler, opts.cfg_scale, opts.schedule) == ("edm_dpm++_3m_sde", 6.0, "v2.1")
    paper = RestoreOptions(preset="paper")
    assert (paper.sampler, paper.steps, paper.prompt, paper.schedule) == ("ddpm", 50, "", None)
    assert RestoreOptions.model_validate_json(opts.model_dump_json()) == opts  # a dump replays as itself
    # the HTTP API and the archive job take the field like any other
    assert restore_options({"preset": "v2.1", "steps": "3"}, {}).sampler == "edm_dpm++_3m_sde"
    assert ArchiveConfig(input="in", output="out", steps=3).options().model_fields_set == {"steps"}


def test_the_models_version_is_the_default_preset(tiny_bundle):
    v21 = RestorationPipeline(copy.copy(tiny_bundle))
    v21.bundle.version = "v2.1"
    opts = v21.options(RestoreOptions(steps=3))
    assert (opts.preset, opts.sampler, opts.steps) == ("v2.1", "edm_dpm++_3m_sde", 3)
    assert v21.diffusion(opts) == V21
    paper = v21.options(RestoreOptions(preset="paper"))  # options say otherwise: the model's schedule
    assert paper.sampler == "ddpm" and v21.diffusion(paper) == v21.bundle.diffusion
    with pytest.raises(ValueError, match="this model is DiffBIR v2.1"):
        v21.diffusion(v21.options(RestoreOptions(preset="v2")))
    unknown = RestorationPipeline(tiny_bundle)  # official files: no version, the plain defaults
    assert unknown.options(RestoreOptions(steps=3)) == RestoreOptions(steps=3)


def test_converted_model_records_its_version_and_restore_uses_its_preset(
    golden_weights, tiny_configs, tmp_path, monkeypatch
):
    heads = str(tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"])
    model = tmp_path / "diffbir-v2.1"
    files = [str(golden_weights / n) for n in TINY_FILES]
    assert cli_main(["convert", *files, "-o", str(model), "--schedule", "v2.1", "--num-head-channels", heads]) == 0
    assert read_manifest(model).version == "v2.1" and load_model(model).version == "v2.1"

    runs = []

    def recording_sample(den, x_T, sampler, steps, **kwargs):
        runs.append((sampler, steps, den.config))
        return x_T

    monkeypatch.setattr(diffbir.pipeline, "sample", recording_sample)
    (tmp_path / "in").mkdir()
    Image.fromarray(data.astronaut()[:64, :64]).save(tmp_path / "in" / "a.png")
    argv = ["restore", str(tmp_path / "in"), "-m", str(model), "--min-side", "64", "--steps", "2", "--overwrite"]
    assert cli_main([*argv, "-o", str(tmp_path / "out")]) == 0
    assert cli_main([*argv, "-o", str(tmp_path / "paper"), "--preset", "paper"]) == 0
    assert runs == [("edm_dpm++_3m_sde", 2, V21), ("ddpm", 2, V21)]
    assert cli_main([*argv, "-o", str(tmp_path / "v2"), "--preset", "v2"]) == 2  # v2's schedule on v2.1 weights


def test_readme_lists_every_preset():
    readme = (ROOT / "README.md").read_text()
    for name, settings in PRESETS.items():
        row = next((line.strip() for line in readme.splitlines() if line.strip().startswith(f"| `{name}` |")), None)
        assert row is not None, f"README: no row for preset {name}"
        assert f"`{settings['sampler']}`" in row and f"| {settings['steps']} |" in row, row


# --- precision: a float32 state whatever the weights' dtype ---------------------------------------


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.02), (torch.float16, 0.005)])
def test_low_precision_weights_follow_the_fp32_trajectory(golden, tiny_bundle, dtype, bound):
    """The v2.1 sampler (10 steps, sigma_0 = 1e4) on the tiny model in bf16/fp16: the state stays float32
    (the network alone runs in the low precision), nothing overflows, and every state is within `bound`
    x max|state| of the fp32 run's (measured: bf16 1.1%, fp16 0.16%). CFG 1: CFG multiplies the
    network's rounding (at cfg 6, bf16 drifts ~17% on this random-weight model, fp16 ~9%)."""
    f = load_fixture(golden, "f_sampling_unguided")
    c_img, c_txt = F.avg_pool2d(f["c_img"], 2), f["c_txt_pos"]
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(c_img.shape, generator=gen)
    draws = [torch.randn(c_img.shape, generator=gen) for _ in range(10)]

    def trajectory(cldm, dtype):
        states, inputs = [], []
        model = cfg_model(cldm, c_img.to(dtype), c_txt.to(dtype))
        den = Denoiser(lambda x, t: inputs.append(x) or model(x, t), V21)
        sample(den, x_T, "edm_dpm++_3m_sde", 10, noise=stored_noise(draws), callback=lambda i, x: states.append(x))
        return states, inputs

    reference, _ = trajectory(tiny_bundle.cldm, torch.float32)
    states, inputs = trajectory(copy.deepcopy(tiny_bundle.cldm).to(dtype), dtype)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in states + inputs)
    torch.testing.assert_close(inputs[0], x_T)  # x_T sqrt(1 + 1e8) * c_in, in float64 scalars: no inf, no 0
    for k, (x, ref) in enumerate(zip(states, reference)):
        assert (x - ref).abs().max() <= bound * ref.abs().max(), f"step {k}"


@pytest.mark.parametrize("space", ["rgb", "latent"])
def test_bf16_pipeline_with_guidance_and_tiling(golden_weights, tiny_configs, pipe, space):
    """The whole pipeline in bf16 (a fresh copy of the weights): the float32 state meets bf16 VAE and UNet
    in the tiled denoiser, the guidance decode and its tile-by-tile gradient; the image stays within
    0.03 mean absolute difference of the fp32 pipeline's (measured: rgb 0.011, latent 0.006)."""
    heads = tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"]
    bf16 = RestorationPipeline(
        load_model([golden_weights / n for n in TINY_FILES], num_head_channels=heads), dtype=torch.bfloat16
    )
    img = data.coffee()[:64, :160].astype(np.float32) / 255
    tiles = dict(tiled=True, tile_size=64, tile_stride=32, guidance_scale=0.5, guidance_space=space)
    opts = RestoreOptions(preset="v2.1", task="denoise", steps=3, cfg_scale=1.0, min_side=64, **tiles)
    (out,) = bf16([img], opts)
    assert out.shape == img.shape and np.isfinite(out).all()
    assert np.abs(out - pipe([img], opts)[0]).mean() < 0.03
