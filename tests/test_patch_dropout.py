"""Patch dropout (``model.image.patch_dropout``, FLIP): ViT towers drop that fraction of image tokens in training and
none at evaluation, class token kept; towers without image tokens refuse it with a clear error."""

from __future__ import annotations

import pytest
import torch

from rankclip_ds.model import ImageTower, ModelConfigError

SMALL = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_clip_224"])
@pytest.mark.parametrize("rate,kept", [(0.0, 16), (0.25, 12), (0.75, 4)])
def test_a_vit_drops_tokens_in_training_and_none_in_eval(name, rate, kept):
    torch.manual_seed(0)
    tower = ImageTower(name, 32, patch_dropout=rate, model_kwargs=SMALL)
    tokens = []
    tower.trunk.blocks[0].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))
    images = torch.randn(2, 3, 32, 32)
    tower.train()(images)
    tower.eval()(images)
    assert tokens == [1 + kept, 1 + 16]  # 4×4 patches at 32 px, patch 8; the class token always kept
    # Evaluation is deterministic (nothing dropped); training draws a new subset each time.
    with torch.no_grad():
        assert torch.equal(tower(images), tower(images))
        if rate > 0:
            tower.train()
            assert not torch.equal(tower(images), tower(images))


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_a_cnn_refuses_patch_dropout(name):
    with pytest.raises(ModelConfigError, match=rf"model\.image\.patch_dropout=0\.5: timm's '{name}' has no patch drop"):
        ImageTower(name, 32, patch_dropout=0.5)
    ImageTower(name, 32, patch_dropout=0.0)  # without it the tower builds
