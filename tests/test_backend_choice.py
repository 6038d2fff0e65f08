"""Which TTT backend TTTDiT uses with the default ``ttt_backend="auto"``: torch on CPU, Triton on CUDA.

The Triton entry points are wrapped with a counter, so the test sees the dispatch the model really makes.
"""

import pytest
import torch

from ttt_video import kernels
from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.dit import TTTDiT


def _run_tiny_model(device, segments=2, grad=False):
    torch.manual_seed(0)
    cfg = preset("tiny")
    assert cfg.ttt_backend == "auto"
    model = TTTDiT(cfg).to(device)
    F = 13 + 12 * (segments - 1)
    x = torch.randn(1, F, cfg.in_channels, cfg.sample_height, cfg.sample_width, device=device)
    text = torch.randn(1, segments, cfg.max_text_seq_length, cfg.text_embed_dim, device=device)
    t = torch.tensor([500], device=device)
    with torch.set_grad_enabled(grad):
        out = model(x, text, t)
        if grad:
            out.square().mean().backward()
    return out


@pytest.fixture
def triton_calls(monkeypatch):
    calls = {"mlp": 0}
    real = kernels.ttt_mlp_triton

    def counting(*args, **kwargs):
        calls["mlp"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "ttt_mlp_triton", counting)
    return calls


def test_auto_backend_is_torch_on_cpu(triton_calls):
    out = _run_tiny_model("cpu")
    assert torch.isfinite(out).all()
    assert triton_calls["mlp"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_auto_backend_is_triton_on_cuda(triton_calls):
    out = _run_tiny_model("cuda", grad=True)
    assert torch.isfinite(out).all()
    # 2 layers x 2 directions, each one TTT scan
    assert triton_calls["mlp"] == 2 * 2
