"""A page model with the engine's interface (:class:`~colstream.embedding.engine.PageModel`)
and no checkpoint: each page gets ``tokens`` L2-normalised vectors derived from its
pixels, so equal pages give equal vectors and different pages different ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from colstream.embedding.model import ImageGrid, ModelInputs


@dataclass
class DummyPageModel:
    dim: int = 128
    tokens: int = 16
    model_name: str = "dummy-page-model"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Set to make forward() raise, as a failing device would.
    fail_forward: BaseException | None = None
    forward_calls: int = 0

    def visual_token_estimate(self, width: int, height: int) -> int:
        return self.tokens

    def preprocess_images(self, images: Sequence[Image.Image]) -> ModelInputs:
        pixels = torch.stack([
            torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).copy()).flatten()
            for image in images
        ])
        mask = torch.ones((len(images), self.tokens), dtype=torch.long)
        return ModelInputs({"pixels": pixels, "attention_mask": mask}, len(images))

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        self.forward_calls += 1
        if self.fail_forward is not None:
            raise self.fail_forward
        pixels = inputs.tensors["pixels"]
        generator = torch.Generator().manual_seed(7)
        projection = torch.randn((pixels.shape[1], self.tokens * self.dim), generator=generator)
        out = (pixels / 255.0 + 0.01) @ projection
        out = out.reshape(pixels.shape[0], self.tokens, self.dim)
        return torch.nn.functional.normalize(out, dim=-1)

    def image_grids(self, inputs: ModelInputs) -> list[ImageGrid | None]:
        side = int(self.tokens ** 0.5)
        grid = ImageGrid(start=0, rows=side, cols=side) if side * side == self.tokens else None
        return [grid] * inputs.size
