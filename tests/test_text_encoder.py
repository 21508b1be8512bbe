"""OpenCLIP text tower: tokenizer (fixture h), checkpoint layout, meta/assign loading, full-size parity."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from open_clip.transformer import TextTransformer
from safetensors import safe_open

from diffbir.models.text_encoder import OpenCLIPTextEncoder, TextEncoderConfig, tokenize
from diffbir.utils.keyed_init import keyed_state_dict

from conftest import MANIFESTS, SINGLE_EVAL, assert_close_golden, load_fixture

SOT, EOT = 49406, 49407  # CLIP BPE vocab specials (README section 6)
PREFIX = "cond_stage_model."  # the text tower's prefix in SD checkpoints


def _manifest_shapes() -> dict[str, list[int]]:
    manifest = json.loads((MANIFESTS / "diffbir_v2_clip_module.json").read_text())
    return {k: v["shape"] for k, v in manifest["keys"].items()}


def _load_from_meta(sd: dict[str, torch.Tensor], config: TextEncoderConfig) -> OpenCLIPTextEncoder:
    """The platform's loading path: build on meta, then take the tensors with assign=True."""
    with torch.device("meta"):
        enc = OpenCLIPTextEncoder(config)
    enc.load_state_dict(sd, strict=True, assign=True)
    if hasattr(enc, "rebuild_buffers"):
        enc.rebuild_buffers()
    enc.eval()
    left_on_meta = [n for n, t in [*enc.named_parameters(), *enc.named_buffers()] if t.is_meta]
    assert not left_on_meta, f"still on meta after assign load: {left_on_meta}"
    return enc


# ---------------------------------------------------------------- tokenizer


def test_tokenize_matches_fixture_h(golden, fixture_index):
    prompts = fixture_index["files"]["h_tokens"]["description"]["prompts"]
    expected = load_fixture(golden, "h_tokens")["tokens"]
    tokens = tokenize(prompts, context_length=expected.shape[1])
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected)
    assert torch.equal(tokenize(prompts[-1], expected.shape[1]), expected[-1:])  # a bare string works too


def test_tokenize_truncation_keeps_eot_last():
    prompt = " ".join(f"word{i}" for i in range(200))
    full = tokenize(prompt, context_length=1000)[0]
    assert (full != 0).sum() > 77  # really longer than the context
    tokens = tokenize([prompt, "short"])
    assert tokens.shape == (2, 77)
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT and (tokens[0] != 0).all()
    assert torch.equal(tokens[0, :76], full[:76])  # plain truncation before the forced EOT
    assert tokens[1, -1] == 0  # short prompts are zero padded


# ---------------------------------------------------------------- layout and loading


def test_state_dict_keys_equal_checkpoint_layout():
    shapes = _manifest_shapes()
    with torch.device("meta"):
        enc = OpenCLIPTextEncoder(TextEncoderConfig())
    assert {k: list(v.shape) for k, v in enc.state_dict().items()} == shapes
    assert list(enc.buffers()) == []  # no non-persistent buffer that an assign load would leave on meta


def test_infer_config_from_manifest_and_meta_load():
    """Full-size shapes, all on meta: inference, strict assign load and a shape-level forward."""
    sd = {k: torch.empty(s, device="meta") for k, s in _manifest_shapes().items()}
    config = TextEncoderConfig.infer(sd)
    width = sd["model.token_embedding.weight"].shape[1]
    assert config.width == width and config.heads == width // 64
    assert config.layers == len({k.split(".")[3] for k in sd if k.startswith("model.transformer.resblocks.")})
    assert config.context_length == sd["model.positional_embedding"].shape[0]
    assert config.output_dim == sd["model.text_projection"].shape[1]
    with torch.device("meta"):
        enc = OpenCLIPTextEncoder(config)
    enc.load_state_dict(sd, strict=True, assign=True)
    out = enc(torch.zeros(2, config.context_length, dtype=torch.long, device="meta"))
    assert out.shape == (2, config.context_length, config.width)


def _shrunk_manifest_sd(width: int, layers: int, salt: int = 7) -> dict[str, torch.Tensor]:
    """The manifest's layout at a small width / depth, with keyed-init values."""
    shapes = _manifest_shapes()
    full_width = shapes["model.token_embedding.weight"][1]
    small = {}
    for key, shape in shapes.items():
        m = re.match(r"model\.transformer\.resblocks\.(\d+)\.", key)
        if m and int(m.group(1)) >= layers:
            continue
        small[key] = [d // full_width * width if d % full_width == 0 else d for d in shape]
    return keyed_state_dict(small, salt)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_small_tower_matches_open_clip_text_transformer(layer):
    """Small tower loaded from meta vs open_clip's own TextTransformer (its causal-mask buffer,
    its forward, token output) truncated to the blocks DiffBIR uses."""
    sd = _shrunk_manifest_sd(width=64, layers=3)
    config = TextEncoderConfig.infer(sd, heads=4, layer=layer)
    assert (config.width, config.layers, config.heads) == (64, 3, 4)
    enc = _load_from_meta(sd, config)

    used = config.layers - (layer == "penultimate")
    ref = TextTransformer(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=used,
        output_dim=config.output_dim,
        output_tokens=True,
    ).eval()
    ref_sd = {k.removeprefix("model."): v for k, v in sd.items() if k != "model.logit_scale"}
    ref_sd = {k: v for k, v in ref_sd.items() if not k.startswith(f"transformer.resblocks.{used}.")}
    ref.load_state_dict(ref_sd, strict=True)

    tokens = tokenize(["a photo of a cat", "", "x " * 100])
    with torch.no_grad():
        expected = ref(tokens)[1]
        out = enc(tokens)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.encode(["a photo of a cat", "", "x " * 100]), out)
    # causal: the context of a prefix does not depend on what follows it
    torch.testing.assert_close(enc(tokenize(["a photo of a dog"]))[0, :4], out[0, :4], rtol=1e-5, atol=1e-5)
    # lower precision runs (mask built in the activations' dtype)
    assert enc.to(torch.bfloat16)(tokens).dtype == torch.bfloat16


# ---------------------------------------------------------------- full size


@pytest.fixture(scope="module")
def full_tower(golden, golden_set, full_configs):
    """The full-size text tower with key-based init weights, built once (meta + assign: one copy)."""
    files = json.loads((golden / "configs" / "full_keys.json").read_text())["files"]
    shapes = {k: v[0] for layout in files.values() for k, v in layout.items() if k.startswith(PREFIX)}
    sd = keyed_state_dict(shapes, golden_set["full_size_init_salt"])
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    clip_cfg = full_configs["cldm"]["params"]["clip_cfg"]
    text_cfg = clip_cfg["text_cfg"]
    config = TextEncoderConfig.infer(sd, heads=text_cfg["heads"], layer=clip_cfg["layer"])
    declared = {k: text_cfg[k] for k in ("width", "layers", "heads", "context_length", "vocab_size")}
    assert config.model_dump(include=set(declared)) == declared
    assert config.output_dim == clip_cfg["embed_dim"]
    enc = _load_from_meta(sd, config)
    del sd
    return enc


@pytest.mark.slow
def test_full_size_keyed_init_checks(golden, full_tower):
    with safe_open(str(golden / "fixtures" / "full_init_checks_all.safetensors"), framework="pt") as f:
        checks = {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
    sd = {PREFIX + k: v for k, v in full_tower.state_dict().items()}
    assert set(checks) == set(sd)
    for key, (first, last, total, sq) in checks.items():
        t = sd[key].detach().flatten()
        assert t[0].item() == first.item() and t[-1].item() == last.item(), key
        # float64 reductions, chunked so no float64 copy of the 50M-element embedding is made
        sums = torch.zeros(2, dtype=torch.float64)
        for c in t.split(1 << 20):
            c = c.to(torch.float64)
            sums += torch.stack([c.sum(), c.dot(c)])
        assert math.isclose(sums[0].item(), total.item(), rel_tol=1e-12), key
        assert math.isclose(sums[1].item(), sq.item(), rel_tol=1e-12), key


@pytest.mark.slow
def test_full_size_context_matches_golden(golden, fixture_index, full_tower):
    full = load_fixture(golden, "full_outputs_all")
    prompts = fixture_index["files"]["full_outputs_all"]["description"]["prompts"]
    assert torch.equal(tokenize(prompts, full["clip.tokens"].shape[1]), full["clip.tokens"])
    with torch.no_grad():
        context = full_tower(full["clip.tokens"])
    assert_close_golden(context, full["clip.context"], **SINGLE_EVAL, name="clip.context")
