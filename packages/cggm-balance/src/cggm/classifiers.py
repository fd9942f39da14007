"""CGGM's per-modality classifiers: one module per modality, or all of them stacked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import Tensor, nn

from mmcore import accepts_padding_mask, masked_mean

__all__ = ["ModalityClassifier", "StackedClassifiers", "as_matrix", "classify", "final_weight"]


def classify(classifier: nn.Module, features: Tensor, padding_mask: Tensor | None) -> Tensor:
    """A classifier's logits on one modality's features.

    A classifier whose ``forward`` takes ``padding_mask`` (the default ones do) gets the features
    as they are, with the mask; any other gets sequences ``[B, T, d]`` mean-pooled over their
    real steps, so a plain ``nn.Sequential`` of linear layers works on sequence encoders too.
    """
    if accepts_padding_mask(classifier):
        return classifier(features, padding_mask=padding_mask)
    return classifier(masked_mean(features, padding_mask) if features.ndim == 3 else features)


def final_weight(module: nn.Module, classifier: str | None = None) -> Tensor:
    """The weight of ``module``'s last Linear/Conv layer (``classifier``: whose, for errors)."""
    layers = [
        m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]
    if not layers and classifier is not None:
        raise TypeError(
            f"CGGM: classifier '{classifier}' ({type(module).__name__}) has no Linear/Conv layer "
            "whose weight the direction term could compare with the head's; end it in one, or "
            "set lam=0."
        )
    if not layers:
        raise TypeError(
            f"{type(module).__name__} has no Linear/Conv layer whose weight could serve as the "
            "head weight of the direction term; pass head_module= or set lam=0."
        )
    return layers[-1].weight


def as_matrix(weight: Tensor) -> Tensor:
    """``[out, in·k…]``: a 1×1 convolution's weight compares equal to a Linear's."""
    return weight.reshape(weight.shape[0], -1)


class ModalityClassifier(nn.Module):
    """A modality's auxiliary classifier on its (detached) encoder features.

    ``[B, T, d]`` sequences are mean-pooled over real (unpadded) steps, ``[B, d]`` vectors used as
    they are: ``Linear(d, F) → ReLU → Linear(F, C)``. For segmentation, ``[B, d, *spatial]``
    feature maps get the same MLP per pixel (a 1×1 convolution, computed as a matmul over the
    channel axis: a 3×3 first layer cost more than the encoders themselves in our segmentation
    benchmark, and the classifier only has to measure what each encoder's features carry). For
    classification and regression CGGM averages maps over their positions first, so they
    arrive here as vectors. ``F`` and ``C`` match the model head's final weight, so the
    direction term can compare the two.
    """

    def __init__(self, feature_shape: tuple[int, ...], hidden: int, num_outputs: int) -> None:
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        d = feature_shape[0] if len(feature_shape) != 2 else feature_shape[1]
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

    def layers(self) -> tuple[nn.Linear, nn.Linear]:
        """The MLP's two linear layers, inner then outer."""
        return cast(nn.Linear, self.net[0]), cast(nn.Linear, self.net[2])

    def forward(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Logits ``[B, C]`` (or ``[B, C, *spatial]`` for feature maps)."""
        if len(self.feature_shape) > 2:  # channels first: the MLP acts on every position
            return self.net(features.movedim(1, -1)).movedim(-1, 1)
        if features.ndim == 3:
            features = masked_mean(features, padding_mask)
        return self.net(features)


class StackedClassifiers(nn.Module):
    """``M`` default classifiers on features of one size, stored as stacked weights.

    The same maths as ``M`` :class:`ModalityClassifier` s on vectors (or mean-pooled sequences),
    run as one batched MLP: ``[M, N, d] → [M, N, C]`` over samples, or over pixels for feature
    maps (the per-pixel MLP). Stacked storage means two ``baddbmm`` calls per forward and four
    tensors for the optimiser instead of ``4 M``, which on small models is most of CGGM's
    overhead; :meth:`forward_backward` also takes the backward by hand. :meth:`from_classifiers`
    stacks existing classifiers (so a run starts from exactly their initialisation);
    :meth:`unstack` gives one back.
    """

    def __init__(
        self,
        modalities: tuple[str, ...],
        in_dim: int,
        hidden: int,
        outputs: int,
        feature_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        m = len(modalities)
        self.modalities = tuple(modalities)
        self.feature_shape = tuple(feature_shape) if feature_shape else (in_dim,)
        self.weight1 = nn.Parameter(torch.empty(m, hidden, in_dim))
        self.bias1 = nn.Parameter(torch.empty(m, hidden))
        self.weight2 = nn.Parameter(torch.empty(m, outputs, hidden))
        self.bias2 = nn.Parameter(torch.empty(m, outputs))

    @classmethod
    @torch.no_grad()
    def from_classifiers(
        cls, classifiers: Mapping[str, ModalityClassifier], modalities: tuple[str, ...]
    ) -> StackedClassifiers:
        """Stack ``classifiers[m]`` for ``m`` in ``modalities`` (same feature shapes)."""
        inner, outer = classifiers[modalities[0]].layers()
        out = cls(
            modalities,
            inner.in_features,
            inner.out_features,
            outer.out_features,
            classifiers[modalities[0]].feature_shape,
        )
        out.to(device=inner.weight.device, dtype=inner.weight.dtype)
        for name, layer, attr in (
            ("weight1", 0, "weight"),
            ("bias1", 0, "bias"),
            ("weight2", 2, "weight"),
            ("bias2", 2, "bias"),
        ):
            getattr(out, name).copy_(
                torch.stack([getattr(classifiers[m].net[layer], attr) for m in modalities])
            )
        return out

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``[M, N, C]`` of stacked features ``[M, N, d]`` (``N``: samples or pixels)."""
        m, _, d = self.weight1.shape
        if features.ndim != 3 or features.shape[0] != m or features.shape[2] != d:
            raise ValueError(
                f"StackedClassifiers expects features [{m}, N, {d}] (modality, sample or pixel, "
                f"feature); got {tuple(features.shape)}."
            )
        hidden = torch.baddbmm(self.bias1.unsqueeze(1), features, self.weight1.transpose(1, 2))
        return torch.baddbmm(self.bias2.unsqueeze(1), hidden.relu(), self.weight2.transpose(1, 2))

    @torch.no_grad()
    def forward_backward(self, features: Tensor, grad_logits: Callable[[Tensor], Tensor]) -> Tensor:
        """Logits ``[M, N, C]``, with every parameter's ``.grad`` set (replaced), without autograd.

        ``grad_logits(logits)`` is the gradient of the loss with respect to the logits. The MLP's
        backward is four batched matrix products and two sums: on small models, recording and
        replaying an autograd graph for it cost more than the arithmetic (``cggm-step-overhead``
        measures the step). Tested equal to autograd through :meth:`forward`.
        """
        pre = torch.baddbmm(self.bias1.unsqueeze(1), features, self.weight1.transpose(1, 2))
        hidden = pre.relu()
        logits = torch.baddbmm(self.bias2.unsqueeze(1), hidden, self.weight2.transpose(1, 2))
        grad_out = grad_logits(logits)  # [M, N, C]
        grad_pre = torch.bmm(grad_out, self.weight2).mul_(pre > 0)  # ReLU's backward
        grads = (
            torch.bmm(grad_pre.transpose(1, 2), features),
            grad_pre.sum(dim=1),
            torch.bmm(grad_out.transpose(1, 2), hidden),
            grad_out.sum(dim=1),
        )
        params = (self.weight1, self.bias1, self.weight2, self.bias2)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        return logits

    @torch.no_grad()
    def unstack(self, modality: str) -> ModalityClassifier:
        """A standalone copy of ``modality``'s classifier."""
        i = self.modalities.index(modality)
        clf = ModalityClassifier(self.feature_shape, self.weight1.shape[1], self.bias2.shape[1])
        clf.to(device=self.weight1.device, dtype=self.weight1.dtype)
        for layer, weight, bias in zip(
            clf.layers(), (self.weight1, self.weight2), (self.bias1, self.bias2), strict=True
        ):
            layer.weight.copy_(weight[i])
            layer.bias.copy_(bias[i])
        return clf
