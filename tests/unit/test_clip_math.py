"""The pure CLIP classifier math, with tensors alone."""

import pytest
import torch

from shelfsight.shared import clip_math


def test_logits_are_scaled_cosine_similarity() -> None:
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    text = clip_math.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    logits = clip_math.attribute_logits(image, text, logit_scale=10.0)
    assert logits[0, 0] == pytest.approx(10.0)
    assert logits[0, 1] == pytest.approx(10.0 / 2**0.5, rel=1e-5)
    assert logits[1, 0] == pytest.approx(0.0, abs=1e-6)


def test_score_heads_softmaxes_per_attribute_and_picks_top() -> None:
    heads = (
        clip_math.AttributeHead("lid", ("yes", "no"), clip_math.normalize(torch.eye(3)[:2])),
        clip_math.AttributeHead("colour", ("r", "g", "b"), clip_math.normalize(torch.eye(3))),
    )
    features = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.1, 0.0]])
    probs = clip_math.score_heads(features, heads, logit_scale=50.0)
    assert probs["lid"].shape == (2, 2) and probs["colour"].shape == (2, 3)
    assert torch.allclose(probs["colour"].sum(-1), torch.ones(2))
    assert clip_math.top_values(probs["colour"], heads[1].values)[0][0] == "b"
    top = clip_math.top_values(probs["lid"], heads[0].values)
    assert top[1][0] == "yes" and top[1][1] > 0.99
    assert top[0][1] == pytest.approx(0.5, abs=1e-4)  # orthogonal to both: undecided


def test_loss_ignores_unlabeled_and_prefers_correct_targets() -> None:
    text = {"a": clip_math.normalize(torch.eye(2)), "b": clip_math.normalize(torch.eye(2))}
    feats = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    right = {"a": torch.tensor([0, 1]), "b": torch.tensor([clip_math.IGNORE, clip_math.IGNORE])}
    wrong = {"a": torch.tensor([1, 0]), "b": torch.tensor([clip_math.IGNORE, clip_math.IGNORE])}
    loss_right = clip_math.multi_attribute_loss(feats, text, right, 10.0)
    loss_wrong = clip_math.multi_attribute_loss(feats, text, wrong, 10.0)
    assert loss_right < 0.01 < loss_wrong
    both = {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 0])}
    assert clip_math.multi_attribute_loss(feats, text, both, 10.0) > loss_right  # sums attributes


def test_loss_has_gradient_for_image_features() -> None:
    feats = torch.randn(4, 8, requires_grad=True)
    text = {"a": clip_math.normalize(torch.randn(3, 8))}
    loss = clip_math.multi_attribute_loss(feats, text, {"a": torch.tensor([0, 1, 2, 0])}, 20.0)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_confusion_and_metrics() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, clip_math.IGNORE])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = clip_math.confusion_matrix(predicted, target, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    accuracy, macro_f1 = clip_math.accuracy_and_macro_f1(confusion)
    assert accuracy == pytest.approx(3 / 5)
    # F1: class0 = 2*1/(2+2)=0.5, class1 = 2*2/(2+3)=0.8, class2 = 0
    assert macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_margin_uncertainty_is_one_minus_the_gap_between_the_two_best_values() -> None:
    from shelfsight.shared.clip_math import margin_uncertainty, product_uncertainty

    probabilities = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.4, 0.2], [0.1, 0.3, 0.6]])
    assert torch.allclose(margin_uncertainty(probabilities), torch.tensor([0.15, 1.0, 0.7]))
    sure = torch.tensor([[1.0, 0.0], [0.55, 0.45], [0.5, 0.5]])
    # the product's priority is its least certain attribute
    assert torch.allclose(product_uncertainty({"a": probabilities, "b": sure}), torch.tensor([0.15, 1.0, 1.0]))
    assert margin_uncertainty(torch.ones(4, 1)).tolist() == [0.0] * 4
