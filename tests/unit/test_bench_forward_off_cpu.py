"""bench's `forward_off_cpu`: the model's forward waits instead of computing, returns probabilities
of the real heads' shapes, and is put back afterwards (the bench's other bursts use the real one)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from shelfsight.shared import clip_math
from shelfsight.worker.model_cache import CategoryModel

ROOT = Path(__file__).resolve().parents[2]


def tiny_model(calls: list[int]) -> CategoryModel:
    class Tower(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            calls.append(len(pixels))
            return torch.ones(len(pixels), 4)

    heads = (clip_math.AttributeHead("colour", ("red", "blue", "green"), torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)),
             clip_math.AttributeHead("lid", ("yes", "no"), torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)))
    return CategoryModel(category="mugs", version="v1", mode="fine_tuned", architecture="tiny", weights_sha256="0",
                         taxonomy_version="1", visual=Tower(), heads=heads, logit_scale=10.0, device=torch.device("cpu"),
                         dtype=torch.float32, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, nbytes=0,
                         preprocess=lambda image: image)


def test_the_forward_waits_without_the_tower_and_is_restored(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("_throughput_phases", None)
    from _throughput_phases import forward_off_cpu

    calls: list[int] = []
    model = tiny_model(calls)
    pixels = torch.zeros(5, 3, 8, 8)
    with forward_off_cpu(0.02):
        started = time.perf_counter()
        scored = model.score(pixels)
        waited = time.perf_counter() - started
    assert calls == []  # the tower never ran
    assert waited >= 5 * 0.02  # as long as the bare forward would take for 5 images
    assert {name: tuple(p.shape) for name, p in scored.items()} == {"colour": (5, 3), "lid": (5, 2)}
    for probabilities in scored.values():
        torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5))
    model.score(pixels)
    assert calls == [5]  # the real forward is back
