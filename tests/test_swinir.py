"""DiffBIR SwinIR (stage 1): golden parity (tiny and full size), config inference, key layout."""

from __future__ import annotations

import json

import pytest
import torch

from diffbir.checkpoints.io import CheckpointError, read_state_dict
from diffbir.models.swinir import SwinIR, SwinIRConfig, swinir_computed_buffers
from diffbir.utils.keyed_init import COMPUTED_BUFFER_SUFFIXES, keyed_state_dict

from conftest import MANIFESTS, SINGLE_EVAL, assert_close_golden, load_fixture

TINY_FILES = ["swinir_tiny.safetensors", "swinir_tiny_statedict_module.ckpt"]


def build(sd: dict[str, torch.Tensor], config: SwinIRConfig | None = None) -> SwinIR:
    """The platform's loading path: construct on meta, take the tensors with assign=True."""
    with torch.device("meta"):
        model = SwinIR(config or SwinIRConfig.infer(sd))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def cases(fixture: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    names = sorted(k.removesuffix(".input") for k in fixture if k.startswith(prefix) and k.endswith(".input"))
    assert names, f"no '{prefix}*.input' tensors in the fixture"
    return names


@pytest.mark.parametrize("filename", TINY_FILES)
def test_tiny_parity(golden, golden_weights, filename):
    model = build(read_state_dict(golden_weights / filename))
    fixture = load_fixture(golden, "a_swinir")
    for case in cases(fixture):
        with torch.no_grad():
            out = model(fixture[f"{case}.input"])
        assert_close_golden(out, fixture[f"{case}.output"], **SINGLE_EVAL, name=f"{filename}:{case}")


def test_infer_tiny_config(golden_weights, tiny_configs):
    sd = read_state_dict(golden_weights / TINY_FILES[0])
    inferred = SwinIRConfig.infer(sd).model_dump()
    expected = tiny_configs["swinir"]["params"]
    common = set(inferred) & set(expected)
    assert common == set(SwinIRConfig.model_fields), "config field names differ from the reference's"
    assert {k: inferred[k] for k in common} == {k: expected[k] for k in common}


def test_computed_buffers_match_stored(golden_weights):
    sd = read_state_dict(golden_weights / TINY_FILES[0])
    computed = swinir_computed_buffers(SwinIRConfig.infer(sd))
    assert set(computed) == {k for k in sd if k.endswith(COMPUTED_BUFFER_SUFFIXES)}
    for key, value in computed.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


def test_rejects_unpadded_input(tiny_configs):
    config = SwinIRConfig(**tiny_configs["swinir"]["params"])
    model = SwinIR(config).eval()
    m = config.pad_multiple
    with pytest.raises(ValueError, match=f"pad.*multiple of {m}"):
        model(torch.rand(1, config.in_chans, m, m + m // 2))


def test_config_validation():
    with pytest.raises(ValueError, match="nearest\\+conv"):
        SwinIRConfig(upsampler="pixelshuffle")
    with pytest.raises(ValueError, match="equally long"):
        SwinIRConfig(depths=[6, 6], num_heads=[6])
    with pytest.raises(ValueError):
        SwinIRConfig(unknown_field=1)
    with pytest.raises(CheckpointError, match="not a DiffBIR SwinIR"):
        SwinIRConfig.infer({"conv_first.weight": torch.zeros(1)})


def test_manifest_key_layout():
    """The released checkpoints' key set and shapes load strictly (random values)."""
    manifest = json.loads((MANIFESTS / "diffbir_swinir_stage1.json").read_text())["keys"]
    dtypes = {k: getattr(torch, v["dtype"]) for k, v in manifest.items()}
    shapes_only = {k: torch.empty(v["shape"], dtype=dtypes[k], device="meta") for k, v in manifest.items()}
    config = SwinIRConfig.infer(shapes_only)
    assert config == SwinIRConfig()  # the defaults are configs/inference/swinir.yaml
    computed = swinir_computed_buffers(config)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, v in manifest.items():
        if key.endswith(COMPUTED_BUFFER_SUFFIXES):
            assert list(computed[key].shape) == v["shape"] and computed[key].dtype == dtypes[key], key
            sd[key] = computed[key]
        else:
            sd[key] = torch.randn(v["shape"], generator=gen, dtype=dtypes[key]) * 0.02
    model = build(sd, config)
    assert set(model.state_dict()) == set(manifest)
    with torch.no_grad():
        out = model(torch.rand(1, 3, config.pad_multiple, config.pad_multiple))
    assert out.shape == (1, 3, config.pad_multiple, config.pad_multiple) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def full_swinir(golden, golden_set, full_configs):
    """Full-size keyed weights (README section 4) for the released SwinIR layout."""
    layouts = json.loads((golden / "configs" / "full_keys.json").read_text())["files"]
    (layout,) = [v for name, v in layouts.items() if name.split()[0] == "swinir"]
    config = SwinIRConfig(**full_configs["swinir"]["params"])
    sd = keyed_state_dict(
        {k: shape for k, (shape, _dtype) in layout.items()},
        salt=golden_set["full_size_init_salt"],
        computed=swinir_computed_buffers(config),
    )
    return config, sd


@pytest.mark.slow
def test_full_size_init_checks(golden, full_swinir):
    _, sd = full_swinir
    checks = load_fixture(golden, "full_init_checks_all")
    for key, tensor in sd.items():
        t = tensor.to(torch.float64).flatten()
        first, last, total, squares = checks[key].tolist()
        assert (t[0].item(), t[-1].item()) == (first, last), key
        torch.testing.assert_close(t.sum().item(), total, rtol=1e-12, atol=0, msg=key)
        torch.testing.assert_close((t * t).sum().item(), squares, rtol=1e-12, atol=0, msg=key)


@pytest.mark.slow
def test_full_size_parity(golden, full_swinir):
    config, sd = full_swinir
    assert SwinIRConfig.infer(sd) == config
    model = build(sd, config)
    fixture = load_fixture(golden, "full_outputs_all")
    for case in cases(fixture, "swinir."):
        with torch.no_grad():
            out = model(fixture[f"{case}.input"])
        assert_close_golden(out, fixture[f"{case}.output"], **SINGLE_EVAL, name=case)
