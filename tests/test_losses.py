"""The glocal losses: against the official implementation's losses and gradients on the golden
batch, and against a direct transcription of the official FocalLoss / BinaryDiceLoss code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalyclip.errors import InvalidInputError
from anomalyclip.train.losses import LOCAL_WEIGHT, dice_loss, focal_loss, glocal_loss, local_loss
from anomalyclip.scoring import patch_probability_maps
from anomalyclip.train.finetune import batch_losses

from .conftest import IMAGE_A, IMAGE_B


def _official_focal(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official ``FocalLoss.forward`` (alpha None, balance_index 0, size_average True)."""
    num_class = logit.shape[1]
    logit = logit.view(logit.size(0), logit.size(1), -1).permute(0, 2, 1).contiguous().view(-1, num_class)
    target = torch.squeeze(target, 1).view(-1, 1)
    alpha = torch.ones(num_class, 1)
    idx = target.cpu().long()
    one_hot_key = torch.FloatTensor(target.size(0), num_class).zero_().scatter_(1, idx, 1)
    one_hot_key = torch.clamp(one_hot_key, smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot_key * logit).sum(1) + smooth
    alpha = torch.squeeze(alpha[idx])
    return (-1 * alpha * torch.pow((1 - pt), gamma) * pt.log()).mean()


def _official_dice(inp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The official ``BinaryDiceLoss.forward``."""
    n = targets.size()[0]
    input_flat, targets_flat = inp.view(n, -1), targets.view(n, -1)
    eff = (2 * (input_flat * targets_flat).sum(1) + 1) / (input_flat.sum(1) + targets_flat.sum(1) + 1)
    return 1 - eff.sum() / n


@pytest.fixture
def random_maps() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 2, 20, 20, generator=g).softmax(dim=1)
    masks = (torch.rand(3, 20, 20, generator=g) > 0.8).float()
    return probs, masks


def test_focal_matches_official_code(random_maps):
    probs, masks = random_maps
    expected = _official_focal(probs, masks.unsqueeze(1))
    assert torch.allclose(focal_loss(probs, masks), expected, rtol=1e-6, atol=0)
    # Target dtype does not matter (bool / uint8 / float masks).
    assert torch.allclose(focal_loss(probs, masks.bool()), expected, rtol=1e-6, atol=0)


def test_dice_matches_official_code(random_maps):
    probs, masks = random_maps
    assert torch.allclose(dice_loss(probs[:, 1], masks), _official_dice(probs[:, 1], masks), rtol=1e-6, atol=0)
    assert torch.allclose(dice_loss(probs[:, 0], 1 - masks), _official_dice(probs[:, 0], 1 - masks), rtol=1e-6, atol=0)


def test_local_loss_is_focal_plus_two_dice(random_maps):
    probs, masks = random_maps
    expected = _official_focal(probs, masks.unsqueeze(1)) + _official_dice(probs[:, 1], masks) + _official_dice(
        probs[:, 0], 1 - masks
    )
    assert torch.allclose(local_loss(probs, masks), expected, rtol=1e-6, atol=0)


def test_perfect_prediction_has_small_loss():
    masks = torch.zeros(2, 8, 8)
    masks[:, 2:5, 2:5] = 1
    probs = torch.stack((1 - masks, masks), dim=1)
    assert float(focal_loss(probs, masks)) < 1e-8
    assert float(dice_loss(probs[:, 1], masks)) < 1e-6
    assert float(local_loss(probs, masks)) < 1e-6
    wrong = probs.flip(1)
    assert float(local_loss(wrong, masks)) > 2.0


def test_glocal_sums_layers_and_weights_local():
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    image = torch.randn(3, 8, generator=g)
    patches = {3: torch.randn(3, 1 + 16, 8, generator=g), 7: torch.randn(3, 1 + 16, 8, generator=g)}
    masks = torch.rand(3, 12, 12, generator=g) > 0.7
    labels = torch.tensor([1, 0, 1])
    out = glocal_loss(text, image, patches, masks, labels)
    per_layer = [local_loss(patch_probability_maps(p, text, 0.07, 12), masks) for p in patches.values()]
    logits = F.normalize(image, dim=-1) @ text.T / 0.07
    assert torch.allclose(out.local, sum(per_layer), rtol=1e-6)
    assert torch.allclose(out.image, F.cross_entropy(logits, labels), rtol=1e-6)
    assert torch.allclose(out.total, LOCAL_WEIGHT * out.local + out.image, rtol=1e-6)


def test_glocal_rejects_bad_shapes():
    text = F.normalize(torch.randn(2, 8), dim=-1)
    with pytest.raises(InvalidInputError, match="masks must be"):
        glocal_loss(text, torch.randn(2, 8), {1: torch.randn(2, 17, 8)}, torch.zeros(3, 12, 12), torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="at least one output layer"):
        glocal_loss(text, torch.randn(2, 8), {}, torch.zeros(2, 12, 12), torch.tensor([0, 1]))


def test_golden_losses_and_gradients(fresh_model, golden):
    """The training step's losses and prompt gradients equal the official ones (S = 518, layer 24)."""
    model = fresh_model
    assert model.config.image_size == 518 and model.config.feature_layers == (24,)
    pixel_values = model.preprocess([IMAGE_A, IMAGE_B])
    with torch.no_grad():
        features = model.encode_image(pixel_values)
    masks = golden["train.gt_mask"]
    loss = batch_losses(model, features.image_features, features.patch_features, masks, torch.tensor([1, 0]))
    for name, value in (("image_loss", loss.image), ("local_loss", loss.local), ("total_loss", loss.total)):
        expected = float(golden[f"train.{name}"])
        assert abs(float(value.detach()) - expected) / abs(expected) < 1e-4, name
    loss.total.backward()
    prompts = model.prompts
    pairs = {
        "ctx_pos": prompts.ctx_normal.grad,
        "ctx_neg": prompts.ctx_anomalous.grad,
        "compound_prompts_text.0": prompts.deep_prompts.grad[0],
    }
    for name, grad in pairs.items():
        expected = golden[f"train.grad.{name}"].reshape(grad.shape)
        assert float((grad - expected).abs().max()) / float(expected.abs().max()) < 1e-3, name
    # Only the prompts receive gradients: CLIP is frozen.
    assert all(p.grad is None for p in model.clip.parameters())
