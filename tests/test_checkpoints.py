"""Official layouts: detection, strict conversion, clear refusals, the platform format, the CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from diffbir.checkpoints.io import CheckpointError, read_state_dict
from diffbir.checkpoints.official import split_official
from diffbir.checkpoints.parts import build_part, infer_config
from diffbir.checkpoints.tiny import write_keyed_files
from diffbir.cli import main as cli_main

from conftest import MANIFESTS, manifest_state_dict

# What each reference manifest is, in the platform's layout names.
MANIFEST_LAYOUTS = {
    "sd21_base_keys_read_by_diffbir.json": "sd21",
    "sd21_base_latentdiffusion_derived.json": "sd21",
    "diffbir_ircontrolnet_checkpoint.json": "ircontrolnet",
    "diffbir_swinir_stage1.json": "swinir",
    "diffbir_v1_swinir_module.json": "swinir",
    "diffbir_v1_full_ckpt_controlldm.json": "diffbir_v1_full",
    "diffbir_v2_controlldm_full_module.json": "diffbir_v2_cldm",
    "diffbir_v2_unet_module.json": "ldm_unet",
    "diffbir_v2_vae_module.json": "ldm_vae",
    "diffbir_v2_clip_module.json": "openclip_text",
    "bsrnet_rrdbnet_x4.json": "spandrel:ESRGAN",
    "scunet_color_real_psnr.json": "spandrel:SCUNet",
}


def test_every_manifest_is_covered():
    on_disk = {p.name for p in MANIFESTS.glob("*.json")} - {"INDEX.json"}
    assert on_disk == set(MANIFEST_LAYOUTS)


def _build_all(official):
    return {
        name: build_part(
            name,
            infer_config(name, sd, source=official.path, layout=official.layout),
            sd,
            official=True,
            source=official.path,
            layout=official.layout,
        )
        for name, sd in official.parts.items()
    }


@pytest.mark.parametrize("manifest", sorted(MANIFEST_LAYOUTS))
def test_manifest_layout_loads_strictly(manifest):
    sd = manifest_state_dict(manifest)
    official = split_official(sd, manifest)
    assert official.layout == MANIFEST_LAYOUTS[manifest]
    if official.stage1 is not None:
        assert sum(v.numel() for v in official.stage1.state_dict().values()) == sum(v.numel() for v in sd.values())
        return
    modules = _build_all(official)
    # every tensor of the file landed in a module (nothing silently dropped) ...
    used = sum(v.numel() for part in official.parts.values() for v in part.values())
    loaded = sum(v.numel() for m in modules.values() for v in m.state_dict().values())
    assert used == loaded
    # ... and only known non-weight buffers were left out
    assert all(
        k in json.loads((MANIFESTS / manifest).read_text()).get("non_parameter_keys", []) or "." not in k
        for k in official.ignored
    ), official.ignored[:5]


@pytest.mark.parametrize(
    "manifest,part", [("diffbir_ircontrolnet_checkpoint.json", "controlnet"), ("diffbir_v2_vae_module.json", "vae")]
)
def test_mismatching_files_are_refused_with_clear_errors(manifest, part):
    good = manifest_state_dict(manifest)
    # a conv weight the architecture inference does not read: the strict check must catch it
    first = [k for k in good if k.endswith(("conv2.weight", "out_layers.3.weight"))][-1]

    def attempt(sd):
        official = split_official(sd, "/data/weights.pth")
        with pytest.raises(CheckpointError) as err:
            _build_all(official)
        msg = str(err.value)
        assert "/data/weights.pth" in msg and official.layout in msg
        return msg

    missing = dict(good)
    del missing[first]
    assert "missing" in attempt(missing)
    extra = {**good, "input_blocks.99.0.weight": torch.empty(1), "encoder.bogus.weight": torch.empty(1)}
    assert "not used" in attempt(extra)
    wrong = dict(good)
    wrong[first] = torch.empty(wrong[first].shape[0] + 1, *wrong[first].shape[1:])
    msg = attempt(wrong)
    assert "shapes differ" in msg and str(list(wrong[first].shape)) in msg


def test_unknown_layout_names_file_and_prefixes():
    sd = {"foo.weight": torch.zeros(2, 2), "bar.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"x\.pth: matches no known layout.*bar, foo"):
        split_official(sd, "x.pth")


def test_unreadable_and_unsafe_files_are_refused(tmp_path):
    truncated = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(100)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        read_state_dict(truncated)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(evil)
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="g.pth"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
    assert zipfile.is_zipfile(evil) and pickle  # the refused file is a normal torch.save zip


def test_wrapped_and_prefixed_checkpoints(tmp_path):
    sd = {"conv.weight": torch.randn(2, 2)}
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    assert torch.equal(read_state_dict(path)["conv.weight"], sd["conv.weight"])


def test_cli_info_and_errors(golden_weights, tiny_configs, capsys, tmp_path):
    weights = golden_weights
    heads = str(tiny_configs["cldm"]["params"]["controlnet_cfg"]["num_head_channels"])
    assert (
        cli_main(["info", "--json", "--num-head-channels", heads, str(weights / "ircontrolnet_tiny.safetensors")]) == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "ircontrolnet" and set(info["parts"]) == {"controlnet"}
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\0" * 10)
    assert cli_main(["info", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err


def test_keyed_files_are_the_reference_files(golden, golden_set, tmp_path):
    """The set's tiny files re-created from its weights manifest and salt are its files, byte for
    byte (the sha256 the manifest records), which is what lets the repository not store them."""
    manifest_path = golden / "weights" / "weights_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    written = write_keyed_files(tmp_path, manifest_path, golden_set["tiny_weights_init_salt"])
    assert {p.name for p in written} == {n for n, e in manifest.items() if "tensors" in e}
    for path in written:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest[path.name]["sha256"], path.name
    other_salt = write_keyed_files(tmp_path / "other", manifest_path, golden_set["tiny_weights_init_salt"] + 1)
    assert hashlib.sha256(other_salt[0].read_bytes()).hexdigest() != manifest[other_salt[0].name]["sha256"]


def test_init_tiny_writes_loadable_official_files(tmp_path, capsys):
    """`diffbir init-tiny`: the three official layouts, recognised by `info`, loaded strictly into a
    pipeline that restores; a rerun keeps the files unless --overwrite."""
    from diffbir.checkpoints.loading import load_model

    out = tmp_path / "tiny"
    assert cli_main(["init-tiny", "--output", str(out)]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == [
        "ircontrolnet_tiny.safetensors",
        "sd21_tiny.safetensors",
        "swinir_tiny.safetensors",
    ]
    capsys.readouterr()
    assert cli_main(["info", "--json", "--num-head-channels", "16", *map(str, files)]) == 0
    layouts = [json.loads(doc)["layout"] for doc in capsys.readouterr().out.replace("}\n{", "}\0{").split("\0")]
    assert layouts == ["ircontrolnet", "sd21", "swinir"]
    bundle = load_model(files, num_head_channels=16)
    assert set(bundle.parts) == {"unet", "vae", "controlnet", "swinir"}
    with torch.no_grad():
        restored = bundle.stage1(torch.rand(1, 3, 64, 64))
    assert restored.shape == (1, 3, 64, 64) and torch.isfinite(restored).all()

    stamp = files[0].stat().st_mtime_ns
    assert cli_main(["init-tiny", "--output", str(out)]) == 0
    assert files[0].stat().st_mtime_ns == stamp
    assert cli_main(["init-tiny", "--output", str(out), "--overwrite", "--salt", "7"]) == 0
    assert files[0].stat().st_mtime_ns != stamp
    assert cli_main(["init-tiny", "--output", str(out), "--layout", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_text_tower_converted_back_from_diffusers_loads():
    """sd2.1-base-zsnr-laionaes5.ckpt was converted from diffusers: no text_projection, no
    logit_scale, no last block. It must load and compute exactly what the complete file does."""
    from diffbir.models.text_encoder import OpenCLIPTextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    full = OpenCLIPTextEncoder(TextEncoderConfig(width=128, heads=2, layers=3, output_dim=128))
    for p in full.parameters():
        p.data.normal_(0, 0.05)
    sd = {f"cond_stage_model.{k}": v for k, v in full.state_dict().items()}
    partial = {
        k: v
        for k, v in sd.items()
        if "text_projection" not in k and "logit_scale" not in k and ".resblocks.2." not in k
    }
    official = split_official(partial, "zsnr.ckpt")
    config = infer_config("text_encoder", official.parts["text_encoder"], source="zsnr.ckpt", layout="sd21")
    assert config.layers == 3 and config.layer == "penultimate"
    loaded = build_part(
        "text_encoder", config, official.parts["text_encoder"], official=True, source="zsnr.ckpt", layout="sd21"
    )
    tokens = torch.randint(0, 49407, (2, 77))
    assert torch.equal(loaded(tokens), full(tokens))
    # a complete file must still be complete: dropping a used key is refused
    del partial["cond_stage_model.model.ln_final.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        build_part(
            "text_encoder",
            config,
            split_official(partial, "x").parts["text_encoder"],
            official=True,
            source="x",
            layout="sd21",
        )
