"""The modality batch: named modality tensors plus the masks that say what is really there.

A :class:`ModalityBatch` is the one input type every package of the toolkit accepts. It holds

* ``inputs``: one tensor per modality, batch first. The layout tells the kind of modality:
  ``[B, T, D]`` a feature sequence, ``[B, D]`` a feature vector, ``[B, T]`` with an integer dtype
  token ids, ``[B, C, ...]`` (4 dims or more) an image or a volume;
* ``presence``: optional bool ``[B]`` per modality, ``True`` where the sample has the modality
  (missing modalities);
* ``padding_masks``: optional bool ``[B, T]`` per sequence modality, ``True`` on padding;
* ``target`` (anything with leading dimension ``B``) and ``sample_ids`` (``B`` ids).

Construction validates every shape and dtype and raises a :class:`ValueError` (or
:class:`TypeError`) naming the modality and the expected vs. found shape.

Example:
    >>> import torch
    >>> batch = ModalityBatch(
    ...     {"text": torch.randn(4, 50, 300), "audio": torch.randn(4, 50, 5)},
    ...     target=torch.randn(4),
    ... )
    >>> batch.modalities, batch.batch_size
    (('text', 'audio'), 4)
    >>> batch = batch.with_missing("audio", torch.tensor([True, False, False, True]))
    >>> batch.is_present("audio").tolist()
    [False, True, True, False]
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NoReturn, cast

import torch
from torch import Tensor

ModalityKind = Literal["sequence", "vector", "tokens", "spatial"]

__all__ = ["ModalityBatch", "ModalityKind", "collate_modalities", "require_modality_batch"]


def _check_same_device(what: str, mask: Tensor, device: torch.device | None) -> None:
    """Masks index the inputs: one on another device would fail later, far from its cause."""
    if mask.device != device:
        raise ValueError(
            f"{what} is on {mask.device} but the inputs are on {device}; "
            "move the batch with .to(device)."
        )


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _modality_kind(x: Tensor) -> ModalityKind:
    if x.ndim == 2:
        return "vector" if x.is_floating_point() else "tokens"
    if x.ndim == 3:
        return "sequence"
    return "spatial"


class ModalityBatch:
    """A batch of named modality tensors with presence and padding masks.

    Args:
        inputs: modality name → tensor, batch first: ``[B, T, D]`` sequence, ``[B, D]`` vector,
            ``[B, T]`` integer token ids, ``[B, C, ...]`` image/volume. Floating or integer dtype.
        target: optional target with leading dimension ``B`` (e.g. ``[B]`` labels or scores).
        presence: optional modality → bool ``[B]``; ``True`` where the sample has the modality.
            Modalities not listed are present for every sample.
        padding_masks: optional modality → bool ``[B, T]``; ``True`` marks padding positions.
            Only for sequence (``[B, T, D]``) and token (``[B, T]`` integer) modalities.
        sample_ids: optional sequence of ``B`` ids (strings, ints, ...).

    Raises:
        TypeError: an input, mask or target is not a tensor, or has the wrong dtype.
        ValueError: shapes disagree; the message names the modality, the expected and the found
            shape.
    """

    __slots__ = ("inputs", "padding_masks", "presence", "sample_ids", "target")

    def __init__(
        self,
        inputs: Mapping[str, Tensor],
        target: Tensor | None = None,
        *,
        presence: Mapping[str, Tensor] | None = None,
        padding_masks: Mapping[str, Tensor] | None = None,
        sample_ids: Sequence[Any] | None = None,
    ) -> None:
        self.inputs: dict[str, Tensor] = dict(inputs)
        self.target = target
        self.presence: dict[str, Tensor] = dict(presence or {})
        self.padding_masks: dict[str, Tensor] = dict(padding_masks or {})
        self.sample_ids: list[Any] | None = None if sample_ids is None else list(sample_ids)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not isinstance(self.inputs, dict) or not self.inputs:
            raise ValueError("ModalityBatch needs at least one modality in `inputs`.")
        first_name: str | None = None
        batch_size = -1
        device = None
        for name, x in self.inputs.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"modality names must be non-empty strings, found {name!r}.")
            if not isinstance(x, Tensor):
                raise TypeError(f"modality '{name}': expected a torch.Tensor, found {type(x)!r}.")
            if x.dtype == torch.bool or x.is_complex():
                raise TypeError(
                    f"modality '{name}': expected a floating or integer tensor, found {x.dtype}."
                )
            if x.ndim < 2:
                raise ValueError(
                    f"modality '{name}': expected at least 2 dims ([B, D] vector, [B, T, D] "
                    f"sequence, [B, C, ...] image/volume), found shape {_shape(x)}."
                )
            if first_name is None:
                first_name, batch_size, device = name, x.shape[0], x.device
            elif x.shape[0] != batch_size:
                raise ValueError(
                    f"modality '{name}': expected batch size {batch_size} (as modality "
                    f"'{first_name}'), found shape {_shape(x)}."
                )
            elif x.device != device:
                raise ValueError(
                    f"modality '{name}' is on {x.device} but '{first_name}' is on {device}; "
                    "move the batch with .to(device)."
                )

        for name, mask in self.presence.items():
            self._check_known(name, "presence")
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    f"presence mask of modality '{name}': expected a bool tensor of shape "
                    f"({batch_size},), found {getattr(mask, 'dtype', type(mask))}."
                )
            if _shape(mask) != (batch_size,):
                raise ValueError(
                    f"presence mask of modality '{name}': expected shape ({batch_size},), "
                    f"found {_shape(mask)}."
                )
            _check_same_device(f"presence mask of modality '{name}'", mask, device)

        for name, mask in self.padding_masks.items():
            self._check_known(name, "padding_masks")
            x = self.inputs[name]
            if _modality_kind(x) not in ("sequence", "tokens"):
                raise ValueError(
                    f"padding mask given for modality '{name}' of shape {_shape(x)}, but padding "
                    "masks apply only to [B, T, D] sequences and [B, T] integer token ids."
                )
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    f"padding mask of modality '{name}': expected a bool tensor (True = padding), "
                    f"found {getattr(mask, 'dtype', type(mask))}."
                )
            expected = _shape(x)[:2]
            if _shape(mask) != expected:
                raise ValueError(
                    f"padding mask of modality '{name}': expected shape {expected}, "
                    f"found {_shape(mask)}."
                )
            _check_same_device(f"padding mask of modality '{name}'", mask, device)

        if self.target is not None:
            if not isinstance(self.target, Tensor):
                raise TypeError(f"target: expected a torch.Tensor, found {type(self.target)!r}.")
            if self.target.ndim == 0 or self.target.shape[0] != batch_size:
                raise ValueError(
                    f"target: expected leading dimension {batch_size}, "
                    f"found shape {_shape(self.target)}."
                )
        if self.sample_ids is not None and len(self.sample_ids) != batch_size:
            raise ValueError(
                f"sample_ids: expected {batch_size} ids, found {len(self.sample_ids)}."
            )

    def _check_known(self, name: str, field: str) -> None:
        if name not in self.inputs:
            raise ValueError(
                f"{field} names modality '{name}', which is not in the batch "
                f"(modalities: {list(self.inputs)})."
            )

    # ------------------------------------------------------------------ accessors
    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names, in insertion order."""
        return tuple(self.inputs)

    @property
    def batch_size(self) -> int:
        """Number of samples ``B``."""
        return next(iter(self.inputs.values())).shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the modality tensors."""
        return next(iter(self.inputs.values())).device

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, modality: str) -> Tensor:
        if not isinstance(modality, str):
            raise TypeError(
                f"ModalityBatch[...] takes a modality name, got {type(modality).__name__}; "
                "select samples with batch.select(index)."
            )
        try:
            return self.inputs[modality]
        except KeyError:
            raise KeyError(
                f"modality '{modality}' is not in the batch (modalities: {list(self.inputs)})."
            ) from None

    def __contains__(self, modality: object) -> bool:
        return modality in self.inputs

    def __iter__(self) -> NoReturn:
        # without this, Python iterates through __getitem__(0), (1), ... and fails on a name
        raise TypeError(
            "a ModalityBatch is not iterable: loop over batch.modalities (names) or "
            "batch.split(size) (sub-batches)."
        )

    def require_target(self) -> Tensor:
        """``target``, or a clear ``ValueError`` when the batch has none.

        For code that needs labels (a loss, a metric): typed as a ``Tensor``, not ``Tensor |
        None``, and failing where the labels are missing rather than deep inside a loss.
        """
        if self.target is None:
            raise ValueError(
                f"{self!r} has no target; this step needs labels (pass target= when building the "
                "batch, or use batch.replace(target=...))."
            )
        return self.target

    def kind(self, modality: str) -> ModalityKind:
        """``"sequence"``, ``"vector"``, ``"tokens"`` or ``"spatial"``, from the tensor layout."""
        return _modality_kind(self[modality])

    def is_present(self, modality: str) -> Tensor:
        """Bool ``[B]``: ``True`` where the sample has ``modality``."""
        x = self[modality]
        mask = self.presence.get(modality)
        if mask is None:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return mask

    def padding_mask(self, modality: str) -> Tensor | None:
        """Bool ``[B, T]`` (``True`` = padding) for ``modality``, or ``None`` if unpadded."""
        self[modality]
        return self.padding_masks.get(modality)

    def __repr__(self) -> str:
        parts = [f"{m}={list(x.shape)}" for m, x in self.inputs.items()]
        extra = []
        if self.target is not None:
            extra.append(f"target={list(self.target.shape)}")
        if self.presence:
            extra.append(f"presence={sorted(self.presence)}")
        if self.padding_masks:
            extra.append(f"padding={sorted(self.padding_masks)}")
        return f"ModalityBatch({', '.join(parts + extra)})"

    # ------------------------------------------------------------------ transforms
    def replace(self, **changes: Any) -> ModalityBatch:
        """A new batch with some fields replaced (``inputs``, ``target``, ``presence``, ...)."""
        fields: dict[str, Any] = {
            "inputs": self.inputs,
            "target": self.target,
            "presence": self.presence,
            "padding_masks": self.padding_masks,
            "sample_ids": self.sample_ids,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(
                f"replace() got unknown fields {sorted(unknown)}; known: {list(fields)}"
            )
        fields.update(changes)
        inputs = fields.pop("inputs")
        target = fields.pop("target")
        return ModalityBatch(inputs, target, **fields)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> ModalityBatch:
        """Move every tensor to ``device``; ``dtype`` applies to floating inputs only.

        As with ``Tensor.to``, a dtype may come first: ``batch.to(torch.float64)``.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("ModalityBatch.to: two dtypes given; pass a device and a dtype.")
            device, dtype = None, device

        def move(t: Tensor, cast: bool) -> Tensor:
            return t.to(
                device=device,
                dtype=dtype if cast and t.is_floating_point() else None,
                non_blocking=non_blocking,
            )

        return self._map(lambda t: move(t, True), lambda t: move(t, False))

    def pin_memory(self) -> ModalityBatch:
        """Every tensor in page-locked memory; ``DataLoader(pin_memory=True)`` calls this.

        A pinned batch's ``to(device, non_blocking=True)`` copies asynchronously.
        """
        return self._map(Tensor.pin_memory, Tensor.pin_memory)

    def _map(
        self, on_inputs: Callable[[Tensor], Tensor], on_others: Callable[[Tensor], Tensor]
    ) -> ModalityBatch:
        """A batch of ``on_inputs`` of each input and ``on_others`` of the target and masks."""
        return ModalityBatch(
            {m: on_inputs(x) for m, x in self.inputs.items()},
            None if self.target is None else on_others(self.target),
            presence={m: on_others(x) for m, x in self.presence.items()},
            padding_masks={m: on_others(x) for m, x in self.padding_masks.items()},
            sample_ids=self.sample_ids,
        )

    def with_missing(
        self, modality: str, missing: Tensor | bool = True, fill: float | None = 0.0
    ) -> ModalityBatch:
        """Mark ``modality`` missing for some samples.

        Args:
            modality: the modality to drop.
            missing: bool ``[B]`` (``True`` = drop for that sample), or a bool for all samples.
            fill: value written into the dropped samples' features (default 0, so a model that
                ignores presence masks cannot see the dropped data); ``None`` keeps the features.

        Returns:
            A new batch; samples already missing stay missing.
        """
        x = self[modality]
        if isinstance(missing, bool):
            missing = torch.full((self.batch_size,), missing, dtype=torch.bool, device=x.device)
        if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
            raise TypeError(f"missing: expected a bool tensor of shape ({self.batch_size},).")
        if _shape(missing) != (self.batch_size,):
            raise ValueError(
                f"missing mask for modality '{modality}': expected shape ({self.batch_size},), "
                f"found {_shape(missing)}."
            )
        missing = missing.to(x.device)
        presence = dict(self.presence)
        presence[modality] = self.is_present(modality) & ~missing
        inputs = dict(self.inputs)
        if fill is not None:
            if not x.is_floating_point() and fill != int(fill):
                raise ValueError(
                    f"fill={fill} cannot be written into modality '{modality}' ({x.dtype}, e.g. "
                    "token ids); give a whole number (a padding id) or fill=None."
                )
            shape = (-1,) + (1,) * (x.ndim - 1)
            inputs[modality] = torch.where(missing.view(shape), torch.full_like(x, fill), x)
        return self.replace(inputs=inputs, presence=presence)

    def select(self, index: Tensor | slice | Sequence[int]) -> ModalityBatch:
        """The sub-batch of samples ``index`` (a slice, an index list/tensor or a bool mask)."""
        if not isinstance(index, slice | Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        if isinstance(index, Tensor):
            index = index.to(self.device)

        def take(t: Tensor) -> Tensor:
            return t[index]

        ids = None
        if self.sample_ids is not None:
            positions = torch.arange(self.batch_size)[
                index.cpu() if isinstance(index, Tensor) else index
            ]
            ids = [self.sample_ids[i] for i in positions.tolist()]
        return ModalityBatch(
            {m: take(x) for m, x in self.inputs.items()},
            None if self.target is None else take(self.target),
            presence={m: take(x) for m, x in self.presence.items()},
            padding_masks={m: take(x) for m, x in self.padding_masks.items()},
            sample_ids=ids,
        )

    def split(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[ModalityBatch]:
        """Iterate over mini-batches of an in-memory batch (no DataLoader needed)."""
        try:
            batch_size = operator.index(batch_size)
        except TypeError:
            raise TypeError(
                f"split(batch_size) takes one mini-batch size, an int; got "
                f"{type(batch_size).__name__} {batch_size!r}. For parts of given sizes, "
                "select() each part's indices."
            ) from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
        n = self.batch_size
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        # checked above, at the call; the parts are selected as they are iterated
        return (
            self.select(order[start : start + batch_size])
            for start in range(0, n, batch_size)
            if not (drop_last and n - start < batch_size)
        )

    @classmethod
    def concat(cls, batches: Sequence[ModalityBatch]) -> ModalityBatch:
        """Concatenate batches along the batch dimension.

        Sequences (``[B, T, D]``) and token ids (``[B, T]``) of different lengths are
        right-padded with zeros to the longest, and their padding masks mark the added steps,
        as :func:`collate_modalities` does for single samples (so a ``Dataset`` may return a
        one-sample batch per item). Any other difference of shape is a ``ValueError``. The
        result holds every modality of any batch: in a batch without one, it is missing for
        every sample (zeros shaped like another batch's, marked missing). Sample ids are kept
        where any batch has them, ``None`` for the samples of a batch without.
        """
        if not batches:
            raise ValueError("concat() needs at least one batch.")
        names = tuple(dict.fromkeys(m for b in batches for m in b.modalities))
        batches = [_with_every_modality(b, names, batches) for b in batches]
        inputs, padding = {}, {}
        for m in names:
            inputs[m], mask = _concat_modality(m, batches)
            if mask is not None:
                padding[m] = mask
        presence_names = {m for b in batches for m in b.presence}
        presence = {m: torch.cat([b.is_present(m) for b in batches]) for m in presence_names}
        targets = [b.target for b in batches]
        if all(t is None for t in targets):
            target = None
        elif any(t is None for t in targets):
            raise ValueError("concat(): some batches have a target and others do not.")
        else:
            target = torch.cat(targets)  # type: ignore[arg-type]
        # a batch without ids gives None for its samples, as collate_modalities does
        ids = None
        if any(b.sample_ids is not None for b in batches):
            ids = [x for b in batches for x in (b.sample_ids or [None] * len(b))]
        return cls(inputs, target, presence=presence, padding_masks=padding, sample_ids=ids)


def _with_every_modality(
    batch: ModalityBatch, names: tuple[str, ...], batches: Sequence[ModalityBatch]
) -> ModalityBatch:
    """``batch`` with ``names`` in that order; one it lacks is zeros, missing for every sample.

    The zeros take the shape (beyond the batch axis), dtype and device of the first of
    ``batches`` that holds the modality.
    """
    if batch.modalities == names:
        return batch
    inputs, presence = {}, dict(batch.presence)
    for m in names:
        if m in batch:
            inputs[m] = batch[m]
            continue
        like = next(b[m] for b in batches if m in b)
        inputs[m] = like.new_zeros(batch.batch_size, *like.shape[1:])
        presence[m] = torch.zeros(batch.batch_size, dtype=torch.bool, device=like.device)
    return batch.replace(inputs=inputs, presence=presence)


def _concat_modality(name: str, batches: Sequence[ModalityBatch]) -> tuple[Tensor, Tensor | None]:
    """One modality of ``batches`` concatenated, with its padding mask (``None``: no padding).

    Sequences and token ids shorter than the longest are right-padded with zeros.
    """
    xs = [b[name] for b in batches]
    first = xs[0]
    is_sequence = _modality_kind(first) in ("sequence", "tokens")
    for i, x in enumerate(xs[1:], start=1):
        same = x.ndim == first.ndim and (
            x.shape[2:] == first.shape[2:] if is_sequence else x.shape[1:] == first.shape[1:]
        )
        if not same or _modality_kind(x) != _modality_kind(first):
            what = "only the time axis of a sequence may differ" if is_sequence else "shapes differ"
            raise ValueError(
                f"concat(): modality '{name}' has shape {_shape(first)} in batch 0 and "
                f"{_shape(x)} in batch {i}; {what}."
            )
    if not is_sequence:
        return torch.cat(xs), None
    length = max(x.shape[1] for x in xs)
    if all(x.shape[1] == length for x in xs) and not any(name in b.padding_masks for b in batches):
        return torch.cat(xs), None
    masks = []
    for b, x in zip(batches, xs, strict=True):
        mask = b.padding_mask(name)
        if mask is None:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        extra = length - x.shape[1]
        masks.append(torch.nn.functional.pad(mask, (0, extra), value=True))
    padded = [
        torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, length - x.shape[1])) for x in xs
    ]
    return torch.cat(padded), torch.cat(masks)


def _pad_stack(name: str, tensors: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack per-sample tensors; sequences of unequal length are right-padded with zeros.

    Per-sample layouts: ``[T, D]`` sequence, ``[T]`` integer tokens, ``[D]`` vector, ``[C, ...]``,
    a scalar (stacked to ``[B, 1]``, a vector of one feature).
    """
    first = tensors[0]
    is_sequence = first.ndim == 2 or (first.ndim == 1 and not first.is_floating_point())
    for t in tensors[1:]:
        same_tail = t.ndim == first.ndim and t.shape[1:] == first.shape[1:]
        if t.shape != first.shape and not (is_sequence and same_tail):
            raise ValueError(
                f"collate: modality '{name}' has per-sample shapes {_shape(first)} and "
                f"{_shape(t)}; only the time axis of a sequence may differ between samples."
            )
    if first.ndim == 0:  # a scalar per sample (e.g. age) is a vector of one feature
        return torch.stack(tensors)[:, None], None
    if not is_sequence:  # every shape was checked equal
        return torch.stack(tensors), None
    lengths = torch.tensor([t.shape[0] for t in tensors])
    if bool((lengths != lengths[0]).any()):
        padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        steps = torch.arange(padded.shape[1], device=padded.device)
        return padded, steps[None, :] >= lengths.to(padded.device)[:, None]
    return torch.stack(tensors), None


def require_modality_batch(obj: Any, caller: str) -> ModalityBatch:
    """``obj`` if it is a :class:`ModalityBatch`, else a ``TypeError`` that says how to make one.

    For the entry points that read masks or modality names off their input: a plain dict of
    tensors would otherwise fail deep inside with an ``AttributeError``.
    """
    if isinstance(obj, ModalityBatch):
        return obj
    hint = (
        "wrap it: ModalityBatch({...}, target=..., padding_masks=...)"
        if isinstance(obj, Mapping)
        else "build one: ModalityBatch({modality: tensor, ...})"
    )
    raise TypeError(f"{caller} takes a ModalityBatch, got a {type(obj).__name__}; {hint}.")


def _as_sample_mapping(sample: Any) -> Any:
    """An ``(inputs, target)`` pair as ``{"inputs": inputs, "target": target}``; else as given."""
    if isinstance(sample, tuple | list) and len(sample) == 2 and isinstance(sample[0], Mapping):
        return {"inputs": sample[0], "target": sample[1]}
    return sample


def _as_modality_tensor(value: Any, modality: str, index: int) -> Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"collate_modalities: sample {index}'s '{modality}' is a {type(value).__name__}, "
            f"not a tensor ({err}). A flat row's other fields (ids, raw text) are left out by "
            "naming the modalities: modalities=(...)."
        ) from None


def _from_flat_row(
    row: Any, index: int, modalities: Sequence[str] | None, target_key: str | None
) -> Mapping[str, Any]:
    """A flat row ``{modality: tensor, ..., target_key: label}`` as ``{"inputs", "target"}``."""
    if not isinstance(row, Mapping) or "inputs" in row:
        return row  # already in the nested form (or not a mapping: reported by the caller)
    names = list(modalities) if modalities is not None else [k for k in row if k != target_key]
    needed = [*names, target_key] if target_key is not None else names
    missing = [k for k in needed if k not in row]
    if missing:
        raise KeyError(
            f"collate_modalities: sample {index} has no {missing}; its keys are "
            f"{sorted(map(str, row))[:8]}."
        )
    sample: dict[str, Any] = {"inputs": {m: row[m] for m in names}}
    if target_key is not None:
        sample["target"] = row[target_key]
    return sample


def _collate_targets(targets: list[Any]) -> Tensor | None:
    """The samples' targets stacked, or ``None`` when no sample has one.

    Some samples with a target and others without (a labelled and an unlabelled set mixed) is
    an error: stacking the first sample's choice would drop every label, or fail on a ``None``.
    """
    lacking = [i for i, t in enumerate(targets) if t is None]
    if len(lacking) == len(targets):
        return None
    if lacking:
        raise ValueError(
            f"collate_modalities: samples {lacking[:10]} have no target but the others do; "
            "give every sample of a batch a target, or none."
        )
    values = [torch.as_tensor(t) for t in targets]
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_modalities: the samples' targets have different shapes {sorted(shapes)}; "
            "a batch stacks them, so each sample needs one of the same shape."
        )
    return torch.stack(values)


def collate_modalities(
    samples: Sequence[Mapping[str, Any] | ModalityBatch | tuple[Mapping[str, Any], Any]],
    *,
    modalities: Sequence[str] | None = None,
    target_key: str | None = None,
) -> ModalityBatch:
    """``collate_fn`` for :class:`torch.utils.data.DataLoader`.

    Each sample is either a :class:`ModalityBatch` (concatenated by :meth:`ModalityBatch.concat`,
    which pads sequences to the longest) or a mapping with keys
    ``"inputs"`` (modality → unbatched tensor, e.g. ``[T, D]``), and optionally ``"target"``,
    ``"sample_id"``, ``"presence"`` (modality → bool) and ``"padding_masks"`` (modality → ``[T]``),
    or an ``(inputs, target)`` pair, the ``(x, y)`` a dataset usually returns.
    Sequences of different lengths are right-padded with zeros and get padding masks.

    A flat row, as a ``datasets.Dataset`` (with ``set_format("torch")``) gives it,
    ``{"text": ..., "audio": ..., "label": 3, "id": "a1"}``, is read with ``modalities`` (the
    keys that are modalities; default: every key but ``target_key``) and ``target_key`` (the
    label's key): ``collate_fn=functools.partial(collate_modalities, modalities=("text",
    "audio"), target_key="label")``.

    The batch holds every modality any sample has. A sample without one (no key, or ``None``)
    gets zeros shaped like the first sample's that has it, and is marked missing there, as
    :meth:`ModalityBatch.with_missing` marks it.
    """
    if not samples:
        raise ValueError("collate_modalities: empty list of samples.")
    batches = [s for s in samples if isinstance(s, ModalityBatch)]
    if len(batches) == len(samples):
        return ModalityBatch.concat(batches)
    if batches:
        raise TypeError(
            "collate_modalities: the samples mix ModalityBatch and mapping items; give one kind."
        )
    samples = [_as_sample_mapping(s) for s in samples]
    if modalities is not None or target_key is not None:
        samples = [_from_flat_row(s, i, modalities, target_key) for i, s in enumerate(samples)]
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or "inputs" not in s:
            found = (
                f"a mapping with keys {sorted(map(str, s))[:8]} but no 'inputs'"
                if isinstance(s, Mapping)
                else type(s).__name__
            )
            raise TypeError(
                f"collate_modalities: sample {i} is {found}; expected a ModalityBatch, a "
                "mapping {'inputs': {modality: unbatched tensor}, 'target': ... (optional)}, "
                "an (inputs, target) pair, or a flat row read with modalities= and target_key="
            )
    mappings = cast(Sequence[Mapping[str, Any]], samples)
    names = list(dict.fromkeys(m for s in mappings for m in s["inputs"]))
    # per modality, the samples that lack it (no key, or None): zeros there, marked missing
    lacking = {m: [s["inputs"].get(m) is None for s in mappings] for m in names}
    inputs: dict[str, Tensor] = {}
    padding: dict[str, Tensor] = {}
    for m in names:
        given_tensors = [
            None if lacks else _as_modality_tensor(s["inputs"][m], m, i)
            for i, (s, lacks) in enumerate(zip(mappings, lacking[m], strict=True))
        ]
        first = next((t for t in given_tensors if t is not None), None)
        if first is None:
            raise ValueError(f"collate_modalities: no sample holds a tensor for modality '{m}'.")
        tensors = [torch.zeros_like(first) if t is None else t for t in given_tensors]
        inputs[m], pad = _pad_stack(m, tensors)
        given = [
            None if lacks else s.get("padding_masks", {}).get(m)
            for s, lacks in zip(mappings, lacking[m], strict=True)
        ]
        if any(g is not None for g in given):
            width = inputs[m].shape[1]
            rows = []
            for i, (g, t) in enumerate(zip(given, tensors, strict=True)):
                row = torch.ones(width, dtype=torch.bool, device=t.device)
                mask = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
                if g is not None:
                    mask = torch.as_tensor(g, dtype=torch.bool, device=t.device)
                    if mask.shape != (t.shape[0],):
                        raise ValueError(
                            f"collate_modalities: sample {i}'s padding mask for '{m}' has shape "
                            f"{tuple(mask.shape)}; its sequence has {t.shape[0]} steps."
                        )
                row[: t.shape[0]] = mask
                rows.append(row)
            pad = torch.stack(rows)
        if pad is not None:
            padding[m] = pad
    presence = {}
    for m in names:
        flags = [s.get("presence", {}).get(m, True) for s in mappings]
        for i, (flag, lacks) in enumerate(zip(flags, lacking[m], strict=True)):
            if lacks and bool(flag) and m in mappings[i].get("presence", {}):
                raise ValueError(
                    f"collate_modalities: sample {i} marks modality '{m}' present but holds no "
                    "tensor for it."
                )
        flags = [bool(f) and not lacks for f, lacks in zip(flags, lacking[m], strict=True)]
        if not all(flags):
            presence[m] = torch.tensor([bool(f) for f in flags], device=inputs[m].device)
    target = _collate_targets([s.get("target") for s in mappings])
    ids = [s.get("sample_id") for s in mappings]
    return ModalityBatch(
        inputs,
        target,
        presence=presence,
        padding_masks=padding,
        sample_ids=None if all(i is None for i in ids) else ids,
    )
