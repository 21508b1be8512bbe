"""Parity with the reference implementation: fixtures b (VAE) and c (UNet + IRControlNet), tiny
weights through the official-layout converters, then the same through the platform format, and
full-size models built by the key-based initialisation (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from diffbir.checkpoints.loading import load_model
from diffbir.checkpoints.official import split_official
from diffbir.checkpoints.parts import build_part, infer_config
from diffbir.cli import main as cli_main
from diffbir.models.cldm import ControlLDM
from diffbir.sampling import RestorationGuidance
from diffbir.utils.keyed_init import keyed_state_dict

from conftest import SINGLE_EVAL, assert_close_golden, full_key_shapes, load_fixture


def check_vae(cldm: ControlLDM, fx: dict, prefix: str = "") -> None:
    with torch.no_grad():
        image = fx[f"{prefix}image01"]
        dist = cldm.vae.encode(image * 2 - 1).latent_dist
        assert_close_golden(dist.mean, fx[f"{prefix}posterior_mean"], **SINGLE_EVAL, name="posterior_mean")
        assert_close_golden(dist.logvar, fx[f"{prefix}posterior_logvar"], **SINGLE_EVAL, name="posterior_logvar")
        assert_close_golden(cldm.condition_latent(image), fx[f"{prefix}c_img"], **SINGLE_EVAL, name="c_img")
        out = cldm.vae_decode(fx[f"{prefix}decode_input_z_scaled"])
        assert_close_golden(out, fx[f"{prefix}decode_output"], **SINGLE_EVAL, name="decode_output")
        if f"{prefix}sample_noise" in fx:  # the training path: a sampled posterior, noise supplied
            z = (dist.mean + torch.exp(0.5 * dist.logvar) * fx[f"{prefix}sample_noise"]) * cldm.latent_scale_factor
            assert_close_golden(z, fx[f"{prefix}z_sampled_scaled"], **SINGLE_EVAL, name="z_sampled")
            dec = cldm.vae_decode(fx[f"{prefix}c_img"])
            assert_close_golden(dec, fx[f"{prefix}decode_c_img_output"], **SINGLE_EVAL, name="decode_c_img")


def check_cldm(cldm: ControlLDM, fx: dict, case: str, c_txt: torch.Tensor, c_img: torch.Tensor) -> None:
    x, t = fx[f"{case}x_t"], fx[f"{case}t"]
    with torch.no_grad():
        assert_close_golden(cldm.unet.time_proj(t), fx[f"{case}t_emb"], **SINGLE_EVAL, name="t_emb")
        plain = cldm.unet(x, t, encoder_hidden_states=c_txt).sample
        assert_close_golden(plain, fx[f"{case}unet_no_control"], **SINGLE_EVAL, name="unet_no_control")
        down, mid = cldm.controlnet(x, t, c_txt, c_img)
        controls = sorted(k for k in fx if k.startswith(f"{case}control."))
        assert len(controls) == len(down) + 1
        for name, got in zip(controls, [*down, mid]):
            assert_close_golden(got, fx[name], **SINGLE_EVAL, name=name)
        strengths = sorted(k for k in fx if k.startswith(f"{case}out_strength_"))
        assert strengths
        for name in strengths:
            s = float(name.removeprefix(f"{case}out_strength_"))
            assert_close_golden(cldm(x, t, c_txt, c_img, control_scale=s), fx[name], **SINGLE_EVAL, name=name)


def cases(fx: dict) -> list[str]:
    return sorted({k.split(".")[0] + "." for k in fx if k.endswith(".x_t")})


def test_tiny_vae_and_cldm(golden, tiny_bundle):
    cldm = tiny_bundle.cldm
    check_vae(cldm, load_fixture(golden, "b_vae"))
    fx = load_fixture(golden, "c_cldm")
    assert cases(fx)
    for case in cases(fx):
        check_cldm(cldm, fx, case, fx["c_txt"], fx["c_img"])


def test_convert_roundtrip_gives_identical_outputs(golden, golden_weights, tiny_configs, tiny_bundle, tmp_path):
    weights = golden_weights
    heads = str(tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"])
    out = tmp_path / "model"
    files = [
        weights / n
        for n in ("sd21_tiny.safetensors", "ircontrolnet_tiny.safetensors", "swinir_tiny_statedict_module.ckpt")
    ]
    assert (
        cli_main(["convert", *map(str, files), "-o", str(out), "--num-head-channels", heads, "--schedule", "v2.1"]) == 0
    )
    manifest = json.loads((out / "model.json").read_text())
    assert set(manifest["parts"]) == {"unet", "vae", "controlnet", "swinir"}
    assert manifest["diffusion"]["parameterization"] == "v" and manifest["diffusion"]["zero_snr"]
    converted = load_model(out)
    assert converted.diffusion.parameterization == "v"
    for name, part in tiny_bundle.parts.items():
        ref = part.module.state_dict()
        got = converted.parts[name].module.state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    fx = load_fixture(golden, "c_cldm")
    case = cases(fx)[0]
    with torch.no_grad():
        a = tiny_bundle.cldm(fx[f"{case}x_t"], fx[f"{case}t"], fx["c_txt"], fx["c_img"])
        b = converted.cldm(fx[f"{case}x_t"], fx[f"{case}t"], fx["c_txt"], fx["c_img"])
    # The weights are bit-identical (above); the outputs agree to float32 rounding only: both
    # models use their files' tensors in place (mmap, assign=True) and CPU kernels round
    # differently at different weight alignments (~1e-6 seen on AMD EPYC).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # an existing output is not replaced without --overwrite; a half-written one never appears
    assert cli_main(["convert", *map(str, files), "-o", str(out), "--num-head-channels", heads]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    bf16 = tmp_path / "bf16"
    assert (
        cli_main(["convert", *map(str, files), "-o", str(bf16), "--num-head-channels", heads, "--dtype", "bf16"]) == 0
    )
    assert load_model(bf16).parts["unet"].module.conv_in.weight.dtype == torch.bfloat16


def test_same_part_twice_is_refused(golden_weights, tiny_configs):
    from diffbir.checkpoints.io import CheckpointError

    sd = golden_weights / "sd21_tiny.safetensors"
    with pytest.raises(CheckpointError, match="part again"):
        load_model([sd, sd], num_head_channels=tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"])


def _keyed_parts(golden, golden_set, layout: str, prefixes: tuple[str, ...]) -> dict:
    shapes = {k: s for k, s in full_key_shapes(golden, layout).items() if k.startswith(prefixes)}
    official = split_official(keyed_state_dict(shapes, golden_set["full_size_init_salt"]), f"keyed {layout}")
    return {
        name: build_part(name, infer_config(name, sd), sd, official=True, source=official.path, layout=official.layout)
        for name, sd in official.parts.items()
    }


@pytest.mark.slow
def test_full_size_vae(golden, golden_set):
    vae = _keyed_parts(golden, golden_set, "sd21", ("first_stage_model.",))["vae"]
    check_vae(ControlLDM(None, None, vae), load_fixture(golden, "full_outputs_all"), prefix="vae.")


@pytest.mark.slow
def test_full_size_unet_and_ircontrolnet(golden, golden_set):
    parts = _keyed_parts(golden, golden_set, "sd21", ("model.diffusion_model.",))
    parts |= _keyed_parts(golden, golden_set, "ircontrolnet", ("",))
    fx = load_fixture(golden, "full_outputs_all")
    cldm = ControlLDM(parts["unet"], parts["controlnet"], None)
    check_cldm(cldm, fx, "cldm.", fx["clip.context"], fx["cldm.c_img"])


@pytest.mark.slow
def test_full_size_guided_update(golden, golden_set, fixture_index):
    """`guid.*`: one region-adaptive guidance update (weighted MSE in RGB, through the full-size
    decoder, no tiles) at the case INDEX.json describes: weight map, loss, the scaled gradient, the
    decoded x0, its vector-Jacobian product and the updated x0."""
    info = fixture_index["files"]["full_outputs_all"]["description"]["guidance"]
    fx = load_fixture(golden, "full_outputs_all")
    vae = _keyed_parts(golden, golden_set, "sd21", ("first_stage_model.",))["vae"]
    guidance = RestorationGuidance(ControlLDM(None, None, vae), fx["guid.target"], info["g_scale_user"])
    assert guidance.scale == pytest.approx(info["internal_scale"])
    assert_close_golden(guidance.weight, fx["guid.weight_map"], **SINGLE_EVAL, name="guid.weight_map")
    update = guidance.update(fx["guid.pred_x0"], info["posterior_mean_coef1"])
    assert update.loss == pytest.approx(info["loss"], rel=SINGLE_EVAL["rtol"])
    for key, actual in {
        "decoded_pred": update.pred,
        "grad_pred_scaled": update.grad_pred_scaled,
        "delta_pred_x0": update.delta,
        "updated_pred_x0": update.x0,
    }.items():
        assert_close_golden(actual, fx[f"guid.{key}"], **SINGLE_EVAL, name=f"guid.{key}")
