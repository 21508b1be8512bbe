"""Captioning (diffbir.captioning): a tiny BLIP the test builds with random weights and saves to
disk (its tokenizer from a vocab file written here: nothing is downloaded) captions real photos;
the caption leads each image's prompt in the pipeline, comes back in the HTTP API's X-Caption
header and in the archive manifest; a failing captioner never fails a restoration."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from skimage import data

# test_serving's app, built with this module's `config`: its fixtures `client` (asked for by name) and `versions`
from test_serving import NAME, SERVER_DEFAULTS, client, restore, versions  # noqa: F401

from diffbir.captioning import (
    MAX_NEW_TOKENS,
    OFFICIAL_INSTRUCTION,
    Caption,
    CaptionerSettings,
    TransformersCaptioner,
    caption_batch,
    combine_prompt,
)
from diffbir.image_io import encode_image
from diffbir.models.text_encoder import OpenCLIPTextEncoder, TextEncoderConfig
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from pipelines.ray_env import free_port
from serving.app import header_text
from serving.archive import ArchiveConfig, restore_archive
from serving.config import ServeConfig

from conftest import TOKEN, save_tiny

FAST = dict(task="denoise", min_side=64, steps=1, cfg_scale=1.0)
WORDS = "a an the photo of man woman cat dog sky tree house red blue green old picture face person street car"
SIDE = 32  # the tiny BLIP's image size


def save_tiny_blip(folder: Path, resize: bool = True) -> Path:
    """A BLIP captioner with random weights (seeded) in save_pretrained layout. resize=False: its
    processor keeps the input's size, so only SIDE x SIDE images caption (others raise)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start
    size = {"height": SIDE, "width": SIDE}
    processor = BlipProcessor(BlipImageProcessor(size=size, do_resize=resize), tokenizer)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ids = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(
        vision_config=small | dict(image_size=SIDE, patch_size=8, initializer_range=1.0),
        text_config=small
        | ids
        | dict(
            vocab_size=len(tokenizer),
            encoder_hidden_size=32,
            max_position_embeddings=64,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("captioner") / "blip")


@pytest.fixture(scope="module")
def fussy_blip_dir(tmp_path_factory) -> Path:
    """Captions SIDE x SIDE inputs only: every other image makes it raise."""
    return save_tiny_blip(tmp_path_factory.mktemp("captioner") / "fussy-blip", resize=False)


def photos() -> list[np.ndarray]:
    """Two real photos of one size (one canvas: batch mates change nothing), three 64² tiles wide."""
    return [data.astronaut()[::4, ::4][:64, :96] / 255.0, data.chelsea()[:64, :96] / 255.0]


# ---------------------------------------------------------------- the captioner


def test_the_captioner_loads_from_disk_and_captions_a_batch(blip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched
    images = photos()
    captioner = TransformersCaptioner(blip_dir, max_new_tokens=6, batch_size=2)
    captions = captioner(images)
    assert len(captions) == 2 and all(captions)
    assert all(set(c.split()) <= set(WORDS.split()) for c in captions)  # words of the tokenizer written here
    assert all(len(c.split()) <= 6 for c in captions)  # max_new_tokens
    # in chunks of one, or alone: the same captions (greedy decoding, nothing depends on batch mates)
    assert TransformersCaptioner(blip_dir, max_new_tokens=6, batch_size=1)(images) == captions
    assert [captioner([im])[0] for im in images] == captions


def save_tiny_llava(folder: Path) -> Path:
    """A LLaVA-style captioner with random weights: a CLIP vision tower, a Llama decoder, a
    word-level tokenizer written here and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", *WORDS.split()]
    words += [w for w in OFFICIAL_INSTRUCTION.split() if w not in words]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": "<image>"}, **specials
    )
    template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    processor = LlavaProcessor(
        images,
        tokenizer,
        chat_template=template,
        patch_size=8,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        vision_feature_select_strategy="default",
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIDE,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_index=words.index("<image>"),
        vision_feature_layer=-1,
        image_seq_length=(SIDE // 8) ** 2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_chat_captioner_is_asked_in_its_chat_format(tmp_path):
    captioner = TransformersCaptioner(save_tiny_llava(tmp_path / "llava"), max_new_tokens=5)
    assert captioner.prompt == f"USER: <image> {OFFICIAL_INSTRUCTION} ASSISTANT:"
    images = photos()
    captions = captioner(images)
    assert len(captions) == 2 and all(captions)
    assert not any(c.startswith("USER:") for c in captions)  # the answer alone, without the prompt before it
    assert [captioner([im])[0] for im in images] == captions


def test_wrong_folders_and_limits_get_clear_errors(tmp_path, blip_dir):
    with pytest.raises(ValueError, match="no such folder"):
        TransformersCaptioner(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        TransformersCaptioner(tmp_path / "empty")
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a loadable image-to-text model"):
        TransformersCaptioner(tmp_path / "bert")
    with pytest.raises(ValidationError, match="no such folder"):
        CaptionerSettings(captioner=str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="captioner_max_new_tokens"):
        CaptionerSettings(captioner=str(blip_dir), captioner_max_new_tokens=MAX_NEW_TOKENS + 1)
    assert CaptionerSettings().load_captioner("cpu", torch.float32) is None  # off by default


def test_prompts_combine_as_the_official_inference():
    assert combine_prompt("a cat on a sofa", "best quality") == "a cat on a sofa, best quality"
    assert combine_prompt("", "best quality") == "best quality"
    assert combine_prompt("a cat", "") == "a cat"


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def texted_pipe(tiny_bundle) -> RestorationPipeline:
    """The tiny model with a tiny text tower (random weights): a prompt changes the restoration."""
    bundle = copy.deepcopy(tiny_bundle)
    width = bundle.cldm.unet.config.cross_attention_dim
    torch.manual_seed(0)
    bundle.cldm.text_encoder = OpenCLIPTextEncoder(TextEncoderConfig(width=width, layers=2, heads=2, output_dim=width))
    return RestorationPipeline(bundle)


@pytest.mark.parametrize("tiled", [False, True])
def test_the_pipeline_prompts_each_image_with_its_caption(texted_pipe, blip_dir, tiled):
    pipe, images, seeds = texted_pipe, photos(), [3, 4]
    opts = RestoreOptions(prompt="high quality", tiled=tiled, tile_size=64, tile_stride=32, **FAST)
    pipe.captioner = TransformersCaptioner(blip_dir, max_new_tokens=6)
    try:
        captions = pipe.caption(images, [opts] * 2)
        captioned = pipe(images, opts, seeds)
        unprompted = pipe(images, opts.model_copy(update={"caption": False}), seeds)
    finally:
        pipe.captioner = None
    assert [c.error for c in captions] == [None, None] and all(c.text for c in captions)
    assert [f"{c.text}, high quality" for c in captions] == [combine_prompt(c.text, opts.prompt) for c in captions]
    assert all(combine_prompt(c.text, opts.prompt) in pipe.contexts for c in captions)
    # the second image as if its prompt had been given: its caption, then the configured prompt
    prompted = opts.model_copy(update={"prompt": combine_prompt(captions[1].text, opts.prompt)})
    (alone,) = pipe([images[1]], prompted, [seeds[1]])
    assert np.abs(captioned[1] - alone).max() < 1e-4
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(captioned, unprompted))  # the captions changed them


class Raising:
    def __call__(self, images):
        raise RuntimeError("captioner exploded")


class Silent:
    def __call__(self, images):
        return ["  "] * len(images)


def test_a_failing_captioner_restores_with_the_default_prompt(texted_pipe, caplog):
    pipe, images, seeds = texted_pipe, photos(), [3, 4]
    opts = RestoreOptions(prompt="high quality", **FAST)
    plain = pipe(images, opts, seeds)
    try:
        with caplog.at_level(logging.WARNING, logger="diffbir.captioning"):
            pipe.captioner = Silent()
            silent = pipe.caption(images, [opts] * 2)
            pipe.captioner = Raising()
            raised = pipe.caption(images, [opts] * 2)
            restored = pipe.restore_grouped(images, [opts.model_copy(update={"seed": s}) for s in seeds])
    finally:
        pipe.captioner = None
    assert silent == [Caption("", "empty caption")] * 2
    assert raised == [Caption("", "RuntimeError: captioner exploded")] * 2  # in the batch, then alone
    assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(restored, plain))  # restored, with the prompt alone
    assert "captioning 2 images failed" in caplog.text and "returned 2 empty captions" in caplog.text


def test_a_failing_batch_is_captioned_again_image_by_image():
    def fussy(images):  # takes one image at a time, and says nothing of a dark one
        if len(images) > 1:
            raise MemoryError("batch too large")
        return ["a bright photo" if images[0].mean() > 0.5 else ""]

    images = [np.ones((4, 4, 3)), np.zeros((4, 4, 3))]
    assert caption_batch(fussy, images) == [Caption("a bright photo"), Caption("", "empty caption")]
    (caption,) = caption_batch(lambda images: ["a", "b"], images[:1])
    assert caption == Caption("", "ValueError: the captioner returned 2 captions for 1 images")


# ---------------------------------------------------------------- the archive job
# (before the HTTP API's: its Serve replica holds a CPU until the module ends, which the archive's actor needs)


def test_the_manifest_records_each_caption(tmp_path, tiny_bundle, fussy_blip_dir):
    src = tmp_path / "in"
    src.mkdir()
    small, other = data.astronaut()[::16, ::16][:SIDE, :SIDE], data.chelsea()[:48, :40]
    (src / "small.png").write_bytes(encode_image(small / 255.0))
    (src / "other.png").write_bytes(encode_image(other / 255.0))
    model = save_tiny(tmp_path / "model", tiny_bundle)
    summary = restore_archive(
        ArchiveConfig(
            input=str(src),
            output=str(tmp_path / "out"),
            model=str(model),
            captioner=str(fussy_blip_dir),
            captioner_max_new_tokens=6,
            contact_sheet=0,
            steps=2,
            min_side=64,
            task="denoise",
        )
    )
    assert summary["restored"] == 2
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out.manifest.parquet").to_pylist()}
    expected = TransformersCaptioner(fussy_blip_dir, max_new_tokens=6)([small / 255.0])[0]
    assert (rows["small.png"]["caption"], rows["small.png"]["caption_error"]) == (expected, None)
    assert rows["other.png"]["status"] == "restored" and rows["other.png"]["caption"] is None
    assert "must match" in rows["other.png"]["caption_error"]
    assert json.loads(rows["small.png"]["options"])["caption"] is True


# ---------------------------------------------------------------- the HTTP API


def test_header_text_is_ascii_and_capped():
    text = "a café\nwith 100% “quotes”"
    encoded = header_text(text)
    assert encoded.isascii() and "\n" not in encoded and unquote(encoded) == text
    assert len(unquote(header_text("x" * 5000))) == 1000


@pytest.fixture(scope="module")
def config(mlflow_store, fussy_blip_dir) -> ServeConfig:
    """test_serving's app (its `client` and `versions` fixtures) with the fussy captioner."""
    token_file = mlflow_store / "serve-token"
    token_file.write_text(TOKEN)
    return ServeConfig(
        model_uri=f"models:/{NAME}@champion",
        tracking_dir=str(mlflow_store / "store"),
        cache_dir=str(mlflow_store / "serve-cache"),
        reload_interval_s=0,
        defaults=SERVER_DEFAULTS,
        port=free_port(),
        auth_token_file=str(token_file),
        max_batch_size=2,
        max_ongoing_requests=4,
        captioner=str(fussy_blip_dir),
        captioner_max_new_tokens=6,
    )


def test_the_caption_comes_back_in_a_header(request, fussy_blip_dir):
    http = request.getfixturevalue("client")
    small = data.astronaut()[::16, ::16][:SIDE, :SIDE]  # the one size the fussy captioner takes
    expected = TransformersCaptioner(fussy_blip_dir, max_new_tokens=6)([small / 255.0])[0]
    r = restore(http, encode_image(small / 255.0), task="denoise", seed=1)
    assert r.status_code == 200, r.text
    assert unquote(r.headers["X-Caption"]) == expected and "X-Caption-Error" not in r.headers
    other = data.chelsea()[:48, :40] / 255.0  # the captioner raises: restored all the same
    r = restore(http, encode_image(other), task="denoise", seed=1)
    assert r.status_code == 200, r.text
    assert "X-Caption" not in r.headers and "must match" in unquote(r.headers["X-Caption-Error"])
    r = restore(http, encode_image(small / 255.0), task="denoise", seed=1, caption="false")
    assert r.status_code == 200 and "X-Caption" not in r.headers and "X-Caption-Error" not in r.headers
