"""Missing-aware prompts (Lee et al., CVPR 2023), the per-case prompt baseline of MPLMM.

"Multimodal Prompting with Missing Modalities for Visual Recognition" learns one prompt per
missing case and attaches it to a frozen multimodal transformer. Here, on the MulT-style
backbone of ``mm_prompts``, each sample's case selects one ``[L, (M − 1) d]`` prompt per branch,
appended before that branch's memory transformer (where MPLMM attaches its missing-type
prompts); missing modalities stay zero-filled. Trained like MPLMM: the prompts, the input
projections and the output layer; the rest of the backbone frozen. Its parameter count grows
as ``2^M`` (one prompt per case), which is what MPLMM's factored prompts avoid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mm_prompts import MulTBackbone
from mm_prompts.missing import case_from_presence
from mmcore import ModalityBatch

__all__ = ["MissingAwarePrompts"]


class MissingAwarePrompts(nn.Module):
    """A frozen :class:`MulTBackbone` with one learnable prompt per missing case and branch.

    Args:
        backbone: the pretrained backbone (frozen here except ``proj`` and ``out``).
        prompt_length: ``L``, tokens per prompt.

    ``model(batch)`` → ``[B, out_dim]``; every sample needs at least one present modality.
    """

    def __init__(self, backbone: MulTBackbone, prompt_length: int = 8) -> None:
        super().__init__()
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}.")
        self.backbone = backbone
        self.modalities = backbone.modalities
        m, d = len(self.modalities), backbone.config.d
        # index 0 (nothing present) is never used; a flat table keeps the lookup one gather
        self.prompts = nn.Parameter(0.02 * torch.randn(2**m, m, prompt_length, (m - 1) * d))
        backbone.requires_grad_(False)
        backbone.proj.requires_grad_(True)
        backbone.out.requires_grad_(True)

    def forward(self, batch: ModalityBatch) -> Tensor:
        """Outputs ``[B, out_dim]`` for a batch that may mix every missing case."""
        presence = torch.stack([batch.is_present(m) for m in self.modalities], dim=1)
        cases = case_from_presence(presence.to(self.prompts.device))
        # index_select, not self.prompts[cases]: the indexing's backward (index_put_ with
        # accumulate) sums repeated cases in a thread-dependent order on CPU, so two runs of
        # the same seed differed in their last bits; index_select's backward is deterministic
        prompts = self.prompts.index_select(0, cases)
        tokens = {b: prompts[:, i] for i, b in enumerate(self.modalities)}  # [B, L, (M-1) d]
        padding = {m: batch.padding_mask(m) for m in self.modalities}
        return self.backbone.forward_projected(self.backbone.project(batch), padding, tokens)
