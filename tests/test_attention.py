"""The denoiser's attention kernel (diffbir.models.attention) and the float32 matmul precision
option: blocked attention equals the fused kernel, it is what bf16/fp16 take on a CPU (and only
they), and `matmul_precision` reaches torch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from diffbir.models import attention
from diffbir.models.attention import DenoiserAttnProcessor, blocked_attention
from diffbir.pipeline import RestorationPipeline

from conftest import TINY_FILES


@pytest.mark.parametrize("shape", [(1, 5, 300, 16, 77), (2, 3, 257, 8, 257)])
def test_blocked_attention_equals_the_fused_kernel(monkeypatch, shape):
    b, heads, n, d, m = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, length, d, generator=gen) for length in (n, m, m))
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", 64 * b * heads * m * 4)  # 64 queries a block: n splits
    out = blocked_attention(q, k, v, d**-0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    low = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), d**-0.5)
    assert low.dtype == torch.bfloat16
    assert (low.float() - out).abs().max() < 0.05 * out.abs().max()


def test_the_denoiser_takes_blocked_attention_only_in_low_precision_on_cpu(tiny_bundle, monkeypatch):
    """Every attention of the UNet and IRControlNet has the processor; in bf16 the call never reaches
    torch's fused kernel (which is made to fail here) and stays near the float32 output; in float32
    it is the fused kernel."""
    cldm = tiny_bundle.cldm
    processors = [*cldm.unet.attn_processors.values(), *cldm.controlnet.attn_processors.values()]
    assert processors and all(isinstance(p, DenoiserAttnProcessor) for p in processors)
    gen = torch.Generator().manual_seed(0)
    x, c_img = (torch.randn(1, 4, 16, 16, generator=gen) for _ in range(2))
    ctx = torch.randn(1, 77, cldm.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        reference = cldm(x, t, ctx, c_img).float()
        low = copy.deepcopy(cldm).bfloat16()

        def fused(*args, **kwargs):
            raise AssertionError("the fused kernel ran")

        monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
        out = low(x, t, ctx, c_img).float()
        with pytest.raises(AssertionError, match="fused kernel ran"):
            cldm(x, t, ctx, c_img)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_matmul_precision_is_set_for_the_process(golden_weights, tiny_configs):
    heads = tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"]
    paths = [golden_weights / name for name in TINY_FILES]
    try:
        RestorationPipeline.from_pretrained(paths, matmul_precision="medium", num_head_channels=heads)
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # what makes the CPU faster
        assert torch.backends.mkldnn.conv.fp32_precision != "bf16"  # slower in bf16 on CPUs: untouched
    finally:
        torch.set_float32_matmul_precision("highest")
