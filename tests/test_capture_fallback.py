"""Capture and export that degrade instead of failing, and errors a person can read (issue 29,
items 4 and 5): real models (timm, transformers) at small configs."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch

import vcyclefx as vf


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- ONNX: a reshape of a transposed attention output in a windowed (block/grid) attention model --


def test_coalesced_maxvit_window_attention_exports_to_onnx_and_matches_torch(tmp_path):
    # the exporter decomposed `reshape` of the (64*B, 4, 2, 32) transposed attention output into
    # a `view` under the symbolic batch ("Cannot view a tensor with shape ..."); one stage of
    # block + grid attention is enough to meet it
    torch.manual_seed(0)
    model = timm.create_model("maxvit_rmlp_nano_rw_256", img_size=64, num_classes=10,
                              embed_dim=(64,), depths=(1,), stem_width=16,
                              head_hidden_size=None).eval()
    x = torch.randn(2, 3, 64, 64)
    small, _ = vf.coalesce(model, (x,), width=0.5, depth=1.0)
    path = vf.export_onnx(small, None, tmp_path / "maxvit.onnx", check=True)
    onnx.checker.check_model(str(path), full_check=True)
