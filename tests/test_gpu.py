"""Checks that need a CUDA GPU (``pytest -m gpu``; scripts/gpu-check.sh runs them first). Without a GPU
they skip; the CPU tests cover the same logic with the CUDA queries patched."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from refat import models
from refat.training import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_device_and_dtype_on_this_gpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert models.auto_device() == torch.device("cuda", 0)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert models.dtype_name("auto") == expected


def test_training_on_gpu_in_mixed_precision(tmp_path):
    """ReFAT on a bf16 model on the GPU: autocast during training, a finite loss, and the plain forward
    (no autocast wrapper) on the returned model."""
    model = build_model("llama", layers=4, hidden=64, dtype=torch.float32)
    model.hf.to("cuda")
    from test_training import PAIRS

    cfg = TrainConfig(method="refat", steps=3, batch_size=4, max_length=96, gradient_checkpointing=True)
    result = train(model, PAIRS, cfg, tmp_path / "gpu", progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert result.model.device.type == "cuda"
    assert not hasattr(result.model.hf, "_original_forward"), "accelerate's autocast wrapper was left on the model"
