"""MPLMM: generative, missing-signal and missing-type prompts on a frozen MulT-style backbone."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_prompts.backbone import MulTBackbone, MulTConfig, _positive_int, zero_padding
from mm_prompts.io import read_pretrained, saved_dtype, write_pretrained
from mm_prompts.missing import case_from_presence
from mmcore import ModalityBatch, held_module, require_modality_batch

__all__ = ["MPLMM"]

InitMode = Literal["default", "reference"]


class MPLMM(nn.Module):
    """Prompt learning for missing modalities (Guo, Jin, Zhao, ACL 2024) on a MulT backbone.

    * **Generative prompts** ``G_m`` ``[L_p, d]`` with a generator whose parameters grow
      *linearly* in ``M``: each source ``s`` is mapped once to a shared prompt-length latent
      ``U_s = pool_s(GELU(F_s x_s))`` ``[B, L_p, d]``; a missing modality ``m`` is generated as
      ``x̂_m = GELU(H_m(G_m + mean_{s available} U_s))`` ``[B, T_m, d]``. (The released code has
      one temporal mixer per (target, available subset): ``M (2^{M−1} − 1)`` of them.)
    * **Missing-signal prompts** ``S^avail_m``, ``S^miss_m`` ``[T_m, d]`` added to the projected
      (present) or generated (missing) sequence.
    * **Missing-type prompts**: per branch ``P_b`` ``[L_p, d]`` and per modality ``C_m``
      ``[T_m, (M−1) d]``; for a sample's case, ``M_k = Σ_m S^{state(m)}_mᵀ C_m`` and
      ``Q_b = P_b M_k`` ``[L_p, (M−1) d]`` are appended to branch ``b`` before its memory
      transformer; the readout is their last token.

    Every sample of a batch may have its own missing case: the forward pass selects with masks
    (``torch.where``), with no Python loop over samples. Presence comes from the batch's
    presence masks (:meth:`mmcore.ModalityBatch.with_missing`,
    :func:`mm_prompts.simulate_missing`).

    Initialisation (``init="default"``): ``P_b = 0`` and ``S``, ``C`` small random, so
    ``Q = 0`` at first but ``P`` gets a non-zero gradient at once (one zero per product chain).
    ``init="reference"`` reproduces the released code (every prompt zero), under which ``P`` and
    ``C`` get exactly zero gradients for ever.

    The backbone is frozen except its input projections and output layer (re-initialised per
    data set in the paper); prompts and generator train.
    """

    def __init__(
        self,
        backbone: MulTBackbone,
        seq_lens: Mapping[str, int],
        *,
        prompt_length: int = 16,
        init: InitMode = "default",
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        if init not in ("default", "reference"):
            raise ValueError(f"init must be 'default' or 'reference', got {init!r}.")
        if not isinstance(backbone, MulTBackbone):
            hint = (
                f" (a {type(backbone).__name__} around one: pass the module it holds, and wrap "
                "the MPLMM instead)"
                if isinstance(held_module(backbone), MulTBackbone)
                else ""
            )
            raise TypeError(
                "MPLMM builds its prompts into a MulTBackbone (load a model trained elsewhere "
                f"with MulTBackbone.from_pretrained or load_state_dict); got "
                f"{type(backbone).__name__}{hint}."
            )
        mods = backbone.modalities
        if set(seq_lens) != set(mods):
            raise ValueError(
                f"seq_lens must name the backbone's modalities {list(mods)}, got {list(seq_lens)}."
            )
        self.backbone = backbone
        self.modalities = mods
        bad = {m: v for m, v in seq_lens.items() if not _positive_int(v)}
        if bad:
            raise ValueError(f"seq_lens must be positive integers, got {bad}.")
        if not _positive_int(prompt_length):
            raise ValueError(f"prompt_length must be a positive integer, got {prompt_length!r}.")
        self.seq_lens = {m: int(seq_lens[m]) for m in mods}
        self.prompt_length, self.init_mode = prompt_length, init
        self.freeze_backbone = freeze_backbone
        d, lp, width = backbone.config.d, prompt_length, (len(mods) - 1) * backbone.config.d
        dims = backbone.config.input_dims
        self.generative_prompts = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(lp, d)) for m in mods}
        )
        self.gen_channel = nn.ModuleDict({m: nn.Linear(dims[m], d) for m in mods})
        self.gen_pool = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(self.seq_lens[m], lp)) for m in mods}
        )
        self.gen_out = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(lp, self.seq_lens[m])) for m in mods}
        )
        self.gen_out_bias = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(self.seq_lens[m], d)) for m in mods}
        )
        self.signal_avail = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(self.seq_lens[m], d)) for m in mods}
        )
        self.signal_miss = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(self.seq_lens[m], d)) for m in mods}
        )
        self.type_prompts = nn.ParameterDict({m: nn.Parameter(torch.zeros(lp, d)) for m in mods})
        self.type_coupling = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(self.seq_lens[m], width)) for m in mods}
        )
        self.reset_parameters()
        # the prompts and generator live where the backbone does, in its dtype
        weight = next((p for p in backbone.parameters() if p.is_floating_point()), None)
        if weight is not None:
            self.to(device=weight.device, dtype=weight.dtype)
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.proj.requires_grad_(True)
            backbone.out.requires_grad_(True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise prompts and generator (see the class docstring)."""
        for m in self.modalities:
            t = self.seq_lens[m]
            nn.init.normal_(self.gen_pool[m], 0.0, 1.0 / math.sqrt(t))
            nn.init.normal_(self.gen_out[m], 0.0, 1.0 / math.sqrt(self.prompt_length))
            nn.init.zeros_(self.gen_out_bias[m])
            nn.init.zeros_(self.type_prompts[m])
            if self.init_mode == "reference":  # the released code: every prompt zero
                for p in (
                    self.generative_prompts[m],
                    self.signal_avail[m],
                    self.signal_miss[m],
                    self.type_coupling[m],
                ):
                    nn.init.zeros_(p)
            else:
                nn.init.normal_(self.generative_prompts[m], 0.0, 0.02)
                nn.init.normal_(self.signal_avail[m], 0.0, 0.02)
                nn.init.normal_(self.signal_miss[m], 0.0, 0.02)
                nn.init.normal_(self.type_coupling[m], 0.0, 1.0 / math.sqrt(t))

    # ------------------------------------------------------------------ pieces
    def presence(self, batch: ModalityBatch) -> Tensor:
        """Bool ``[B, M]`` presence matrix; every sample needs at least one modality."""
        presence = torch.stack([batch.is_present(m) for m in self.modalities], dim=1)
        case_from_presence(presence)  # validates: raises if a sample has nothing
        return presence

    def _fit_lengths(self, batch: ModalityBatch) -> ModalityBatch:
        """``batch`` with shorter sequences right-padded to the built lengths, as padding.

        The prompts have one row per position of the lengths given at construction; a shorter
        sequence is the same as that sequence padded and masked (tested), a longer one is an
        error. A modality the batch lacks altogether is missing for every sample (zeros,
        marked absent), as if each sample's case left it out.
        """
        batch = require_modality_batch(batch, "MPLMM")
        inputs, masks, padded = dict(batch.inputs), dict(batch.padding_masks), False
        absent = [m for m in self.modalities if m not in batch]
        if absent:
            if len(absent) == len(self.modalities):
                raise ValueError(
                    f"MPLMM: the batch has none of the modalities {list(self.modalities)} "
                    f"(it has {list(batch.modalities)})."
                )
            unknown = [m for m in batch.modalities if m not in self.modalities]
            if unknown:  # most likely a misnamed key, which would pass as a missing modality
                raise ValueError(
                    f"MPLMM: the batch lacks {absent} and has {unknown}, which the model does "
                    f"not know (its modalities: {list(self.modalities)})."
                    f"{_renames(unknown, absent)} A modality the batch lacks counts as missing "
                    "for every sample: rename the batch's keys, or drop the unknown ones to mean "
                    "it."
                )
            like = next(batch[m] for m in self.modalities if m in batch)
            dims = self.backbone.config.input_dims
            presence = dict(batch.presence)
            for m in absent:
                inputs[m] = like.new_zeros(like.shape[0], self.seq_lens[m], dims[m])
                presence[m] = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
            batch = batch.replace(inputs=inputs, presence=presence)
        for m in self.modalities:
            x, length = batch[m], self.seq_lens[m]
            if x.ndim != 3 or x.shape[1] > length:
                raise ValueError(
                    f"MPLMM: modality '{m}' must be [B, T <= {length}, D] sequences (the prompts "
                    f"have one row per position; shorter ones are padded), got {tuple(x.shape)}."
                )
            extra = length - x.shape[1]
            if extra:
                pad = masks.get(m)
                if pad is None:
                    pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
                inputs[m] = F.pad(x, (0, 0, 0, extra))
                masks[m] = F.pad(pad, (0, extra), value=True)
                padded = True
        return batch.replace(inputs=inputs, padding_masks=masks) if padded else batch

    def source_latents(self, batch: ModalityBatch) -> Tensor:
        """``U_s`` for every modality: ``[B, M, L_p, d]``."""
        return torch.stack([self._latent(batch, s) for s in self.modalities], dim=1)

    def _latent(self, batch: ModalityBatch, s: str) -> Tensor:
        """``U_s`` ``[B, L_p, d]``; padded steps of ``s`` contribute nothing."""
        pad = batch.padding_mask(s)
        u = F.gelu(self.gen_channel[s](zero_padding(batch[s], pad)))  # [B, T_s, d]
        return torch.einsum("btd,tl->bld", zero_padding(u, pad), self.gen_pool[s])

    def generate(self, batch: ModalityBatch, presence: Tensor) -> dict[str, Tensor]:
        """Generated sequences ``[B, T_m, d]`` for every modality, from the present ones."""
        u = self.source_latents(batch)  # [B, M, Lp, d]
        weight = presence.to(u.dtype)[:, :, None, None]
        pooled = (u * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # [B, Lp, d]
        return {
            m: F.gelu(
                torch.einsum("bld,lt->btd", self.generative_prompts[m] + pooled, self.gen_out[m])
                + self.gen_out_bias[m]
            )
            for m in self.modalities
        }

    def type_tokens(self, presence: Tensor) -> dict[str, Tensor]:
        """Missing-type prompts ``Q_b`` ``[B, L_p, (M−1) d]`` per branch for each sample's case."""
        avail = torch.stack(
            [self.signal_avail[m].T @ self.type_coupling[m] for m in self.modalities]
        )
        miss = torch.stack([self.signal_miss[m].T @ self.type_coupling[m] for m in self.modalities])
        mk = torch.where(presence[:, :, None, None], avail, miss).sum(dim=1)  # [B, d, (M-1) d]
        return {b: torch.einsum("ld,bdw->blw", self.type_prompts[b], mk) for b in self.modalities}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: ModalityBatch) -> Tensor:
        """``[B, out_dim]`` for a batch that may mix every missing case."""
        return self.backbone.forward_projected(*self.backbone_inputs(batch))

    def backbone_inputs(
        self, batch: ModalityBatch
    ) -> tuple[dict[str, Tensor], dict[str, Tensor | None], dict[str, Tensor]]:
        """What :meth:`forward` hands the frozen backbone's transformers for ``batch``.

        ``(sequences, padding, type_tokens)`` for ``backbone.forward_projected``: each
        modality's projected (present) or generated (missing) sequence ``[B, T, d]`` with its
        missing-signal prompt added, its padding mask (``None``: none), and each branch's
        missing-type tokens. The missing-case stage, for a caller that inspects it or times
        the backbone apart.
        """
        batch = self._fit_lengths(batch)
        presence = self.presence(batch).to(batch.device)
        # a missing modality's values are never read: zeroed, not multiplied by 0 (NaN × 0 is
        # NaN, and would reach the outputs and the input projections' gradients)
        if batch.presence:  # no presence mask: every modality is present
            batch = batch.replace(
                inputs={
                    **batch.inputs,
                    **{
                        m: batch[m].masked_fill(~presence[:, i, None, None], 0.0)
                        for i, m in enumerate(self.modalities)
                        if m in batch.presence
                    },
                }
            )
        projected = self.backbone.project(batch)
        generated = self.generate(batch, presence)
        z, padding = {}, {}
        for i, m in enumerate(self.modalities):
            here = presence[:, i, None, None]
            z[m] = torch.where(
                here, projected[m] + self.signal_avail[m], generated[m] + self.signal_miss[m]
            )
            pad = batch.padding_mask(m)
            padding[m] = None if pad is None else pad & presence[:, i, None]
        return z, padding, self.type_tokens(presence)

    def forward_per_sample(self, batch: ModalityBatch) -> Tensor:
        """The same model, one sample at a time, with explicit Python branching on its case.

        This is the released code's structure: a slow reference for tests and speed comparisons.
        """
        batch = self._fit_lengths(batch)
        if batch.batch_size == 0:  # no sample to loop over: the empty [0, out] of forward
            return self(batch)
        outputs = []
        for i in range(batch.batch_size):
            one = batch.select([i])
            present = [m for m in self.modalities if bool(one.is_present(m))]
            if not present:
                raise ValueError(f"sample {i} has every modality missing.")
            pooled = sum(self._latent(one, s) for s in present) / len(present)
            z, padding, mk = {}, {}, 0
            for m in self.modalities:
                if m in present:
                    x = zero_padding(one[m], one.padding_mask(m))
                    z[m] = self.backbone.proj[m](x.transpose(1, 2)).transpose(1, 2)
                    z[m] = z[m] + self.signal_avail[m]
                    padding[m] = one.padding_mask(m)
                    mk = mk + self.signal_avail[m].T @ self.type_coupling[m]
                else:
                    h = torch.einsum(
                        "bld,lt->btd", self.generative_prompts[m] + pooled, self.gen_out[m]
                    )
                    z[m] = F.gelu(h + self.gen_out_bias[m]) + self.signal_miss[m]
                    padding[m] = None
                    mk = mk + self.signal_miss[m].T @ self.type_coupling[m]
            tokens = {b: (self.type_prompts[b] @ mk)[None] for b in self.modalities}
            outputs.append(self.backbone.forward_projected(z, padding, tokens))
        return torch.cat(outputs)

    # ------------------------------------------------------------------ bookkeeping
    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, backbone)`` parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.backbone.parameters())

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """``config.json`` + ``model.safetensors`` (state dict, never a pickled module)."""
        config = {
            "backbone": self.backbone.config_dict(),
            "seq_lens": self.seq_lens,
            "prompt_length": self.prompt_length,
            "init": self.init_mode,
            "freeze_backbone": self.freeze_backbone,
        }
        write_pretrained(directory, self.state_dict(), config, "MPLMM.save_pretrained")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], dtype: torch.dtype | None = None
    ) -> MPLMM:
        """Rebuild a model saved with :meth:`save_pretrained` (the same parameters trainable).

        On the CPU. ``dtype``: the parameters' dtype; ``None`` keeps the one they were saved in.
        """
        config, state = read_pretrained(directory, "MPLMM.from_pretrained")
        if "seq_lens" not in config:
            raise ValueError(
                f"MPLMM.from_pretrained: {directory} holds a MulTBackbone, not an MPLMM model; "
                "load it with MulTBackbone.from_pretrained and wrap it: MPLMM(backbone, ...)."
            )
        freeze = config.get("freeze_backbone", True)  # configs saved before the key existed
        model = cls(
            MulTBackbone(MulTConfig(**config["backbone"])).to(
                saved_dtype(state, dtype, "MPLMM.from_pretrained")
            ),
            config["seq_lens"],
            prompt_length=config["prompt_length"],
            init=config["init"],
            freeze_backbone=freeze,
        )
        model.load_state_dict(state)
        return model


def _renames(unknown: list[str], absent: list[str]) -> str:
    """``" Did you mean 'text' for 'txt'?"`` for the unknown names close to an absent one."""
    pairs = [
        (close[0], name)
        for name in unknown
        if (close := difflib.get_close_matches(name, absent, n=1, cutoff=0.5))
    ]
    if not pairs:
        return ""
    return " Did you mean " + ", ".join(f"'{a}' for '{u}'" for a, u in pairs) + "?"
