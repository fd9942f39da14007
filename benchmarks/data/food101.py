"""UPMC-Food101 in its release layout, a generator of that layout, and feature extraction.

Layout (the release, and the copies users have)::

    images/{train,test}/<class>/<class>_<n>.jpg
    texts/{train,test}_titles.csv      # image filename, title, class name

Some copies have a header (BalanceBenchmark's ``Image_path,text,label``), some do not: both are
detected. The release has a row with an unclosed quote (near ``breakfast_burrito_730``) that
makes a plain CSV reader swallow the following rows, so each line is parsed on its own: the
filename is everything before the first comma, the class name everything after the last one,
the title what lies between (surrounding quotes stripped).

Features come from ``transformers`` models loaded from local paths (no download): an image
encoder (e.g. ``ViTModel``) over pixel values, prepared by the image processor saved beside it
when there is one, and a text encoder (e.g. ``BertModel``) with its tokenizer; every token of
both is kept, so adapters see the sequences. Kept tokens take memory: ViT-B/16's 197 × 768 floats
are 0.6 MB an image, about 40 GB for the release's 68k training images, so take a few per class
with ``load_food101(..., max_per_class=k)`` on a machine of ordinary size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks.data.pickles import DataFormatError
from mmcore import ModalityBatch

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Food101Split",
    "extract_food101_features",
    "load_food101",
    "read_titles_csv",
    "write_food101",
    "write_tiny_encoders",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Food101Split:
    """One split: image paths, titles and integer labels (index into ``classes``)."""

    image_paths: list[Path]
    titles: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_titles_csv(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """``(filename, title, class)`` rows of a ``*_titles.csv``, header or not, line by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UPMC-Food101 titles file not found: {path}")
    rows = []
    # utf-8-sig: a file saved by a spreadsheet starts with a byte-order mark, which would
    # otherwise become part of the first filename
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.count(",") < 2:
                raise DataFormatError(
                    f"{path}:{lineno}: expected 'filename,title,class', found {line[:80]!r}."
                )
            filename, rest = line.split(",", 1)
            title, label = rest.rsplit(",", 1)
            filename, label = filename.strip().strip('"'), label.strip().strip('"')
            if lineno == 1 and not filename.lower().endswith(_IMAGE_SUFFIXES):
                continue  # a header such as Image_path,text,label
            title = title.strip()
            if len(title) >= 2 and title[0] == title[-1] == '"':
                title = title[1:-1].replace('""', '"')
            rows.append((filename, title.strip('"').strip(), label))
    return rows


def load_food101(
    root: str | os.PathLike,
    split: str = "train",
    *,
    max_per_class: int | None = None,
    seed: int = 0,
) -> Food101Split:
    """Read split ``"train"`` or ``"test"`` of a UPMC-Food101 folder (see the module docstring).

    Args:
        root: the folder holding ``images/`` and ``texts/``.
        split: ``"train"`` or ``"test"``.
        max_per_class: keep at most this many images of each class, drawn at random (the same
            draw for the same files and seed), in file order. ``None``: all of them.
        seed: the seed of that draw.

    Raises:
        FileNotFoundError: a folder or file of the layout is missing.
        DataFormatError: a row names an unknown class or an image that is not there.
    """
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be a positive count or None, got {max_per_class}.")
    if split not in ("train", "test"):
        raise ValueError(
            f"UPMC-Food101 has splits 'train' and 'test' (no official valid), got {split!r}."
        )
    root = Path(root)
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"UPMC-Food101: no folder {image_dir} (expected images/{split}/<class>/)."
        )
    classes = sorted(p.name for p in (root / "images" / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(f"UPMC-Food101: no class folders in {root / 'images' / 'train'}.")
    index = {c: i for i, c in enumerate(classes)}
    rows = read_titles_csv(root / "texts" / f"{split}_titles.csv")
    paths, titles, labels, missing = [], [], [], []
    for filename, title, label in rows:
        if label not in index:
            raise DataFormatError(
                f"UPMC-Food101 {split}_titles.csv: class {label!r} of {filename!r} is not a folder "
                f"of images/train ({len(classes)} classes)."
            )
        image = image_dir / label / filename
        if not image.is_file():
            missing.append(str(image))
            continue
        paths.append(image)
        titles.append(title)
        labels.append(index[label])
    if missing:
        raise DataFormatError(
            f"UPMC-Food101 {split}: {len(missing)} images named in the titles file are missing, "
            f"e.g. {missing[0]}."
        )
    if max_per_class is not None:
        keep = _draw_per_class(labels, max_per_class, seed)
        paths, titles = [paths[i] for i in keep], [titles[i] for i in keep]
        labels = [labels[i] for i in keep]
    return Food101Split(paths, titles, labels, classes)


def _draw_per_class(labels: list[int], k: int, seed: int) -> list[int]:
    """Indices of at most ``k`` samples per label, drawn at random, in ascending order."""
    rng = np.random.default_rng(seed)
    by_label = np.asarray(labels)
    keep = [rng.permutation(np.flatnonzero(by_label == label))[:k] for label in np.unique(by_label)]
    return sorted(int(i) for i in np.concatenate(keep)) if keep else []


def _open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as RGB (greyscale, palette and RGBA images alike)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() reads the whole file, so it fails here
    except OSError as err:  # PIL's unreadable and truncated images are OSErrors
        raise DataFormatError(f"UPMC-Food101: cannot read the image {path}: {err}") from err


def _pixels(paths: list[Path], processor: Any, size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` pixel values: by the encoder's saved image processor, else ViT's."""
    from PIL import Image

    images = [_open_rgb(p) for p in paths]
    if processor is not None:
        return processor(images=images, return_tensors="pt")["pixel_values"]
    arrays = [
        np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        for img in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.5  # the default of ViTImageProcessor (mean = std = 0.5)


def _image_processor(folder: str | os.PathLike) -> Any:
    """The image processor saved in ``folder`` (``preprocessor_config.json``), or ``None``."""
    if not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def extract_food101_features(
    data: Food101Split,
    image_encoder: str | os.PathLike,
    text_encoder: str | os.PathLike,
    *,
    max_text_len: int = 50,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool | Callable[[int, int], None] = True,
) -> ModalityBatch:
    """Frozen-encoder token features: ``image`` ``[N, 1 + patches, D]``, ``text`` ``[N, L, D]``.

    Both encoders load from local folders written by ``save_pretrained`` (the text folder also
    holds the tokenizer). Images go through the image processor saved in the image folder
    (``AutoImageProcessor``) when there is one, else ViT's default resize and normalisation.
    Text padding becomes the batch's padding mask.

    Args:
        data: a split from :func:`load_food101`.
        image_encoder: folder of the image model (and, optionally, its image processor).
        text_encoder: folder of the text model and its tokenizer.
        max_text_len: titles are padded or truncated to this many tokens.
        batch_size: images and titles per encoder call.
        device: where the encoders run; the features come back on the CPU.
        progress: ``True``: a progress bar over the images (on a terminal); or a callable
            given ``(images done, total)`` after each batch; ``False``: nothing.

    Raises:
        FileNotFoundError: an encoder folder has no ``config.json``.
        DataFormatError: an image cannot be read (the error names it).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    if len(data) == 0:
        raise ValueError("UPMC-Food101: the split holds no image to extract features from.")
    for role, folder in (("image", image_encoder), ("text", text_encoder)):
        # a missing folder would be read as a Hub model id, and fetched over the network
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(
                f"UPMC-Food101 {role} encoder: no config.json in {folder}; expected a folder "
                "written by save_pretrained (nothing is downloaded)."
            )
    image_model = AutoModel.from_pretrained(image_encoder, local_files_only=True)
    image_model = image_model.to(device).eval()
    text_model = AutoModel.from_pretrained(text_encoder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_encoder, local_files_only=True)
    processor = _image_processor(image_encoder)
    size = int(image_model.config.image_size)
    bar = tqdm(
        total=len(data),
        desc="Food101 features",
        unit="image",
        disable=None if progress is True else True,
    )
    images, texts, pads = [], [], []
    for start in range(0, len(data), batch_size):
        chunk = slice(start, start + batch_size)
        pixels = _pixels(data.image_paths[chunk], processor, size).to(device)
        images.append(image_model(pixel_values=pixels).last_hidden_state.cpu())
        tokens = tokenizer(
            data.titles[chunk],
            padding="max_length",
            truncation=True,
            max_length=max_text_len,
            return_tensors="pt",
        ).to(device)
        texts.append(text_model(**tokens).last_hidden_state.cpu())
        pads.append(tokens["attention_mask"].cpu() == 0)
        done = min(start + batch_size, len(data))
        bar.update(done - start)
        if callable(progress):
            progress(done, len(data))
    bar.close()
    return ModalityBatch(
        {"image": torch.cat(images), "text": torch.cat(texts)},
        torch.tensor(data.labels),
        padding_masks={"text": torch.cat(pads)},
        sample_ids=[p.name for p in data.image_paths],
    )


_WORDS = (
    "tasty",
    "homemade",
    "easy",
    "recipe",
    "best",
    "quick",
    "classic",
    "spicy",
    "fresh",
    "with",
    "and",
    "the",
    "sauce",
    "style",
    "my",
    "favourite",
)


def write_food101(
    root: str | os.PathLike,
    classes: tuple[str, ...] = ("apple_pie", "breakfast_burrito", "caesar_salad", "donuts"),
    *,
    n_per_class: tuple[int, int] = (12, 6),
    header: bool = True,
    image_size: int = 48,
    seed: int = 0,
) -> Path:
    """Write a small UPMC-Food101 copy in the release layout, with planted class signal.

    Each class has its own base colour and stripe frequency in the images and its own name in
    the titles (plus filler words), so both modalities carry the label. One title has an
    unclosed quote, as in the release.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "test"), n_per_class, strict=True):
        lines = ["Image_path,text,label"] if header else []
        for ci, cls in enumerate(classes):
            folder = root / "images" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(ci * 67) % 256, (ci * 131 + 60) % 256, (ci * 29 + 120) % 256])
            for i in range(n):
                stripes = np.sin(np.arange(image_size) * (ci + 1) * 0.3)[None, :, None] * 40
                pixels = colour + stripes + rng.normal(0, 25, (image_size, image_size, 3))
                name = f"{cls}_{i}.jpg"
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
                filler = " ".join(rng.choice(_WORDS, size=3))
                title = f"{filler} {cls.replace('_', ' ')}"
                if i == 1 and ci == 0:
                    title = f'"{title}, with a comma'  # the release's unclosed quote
                elif i == 2:
                    title = f'"{title}, quoted"'
                lines.append(f"{name},{title},{cls}")
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n")
    return root


def write_tiny_encoders(
    folder: str | os.PathLike, words: tuple[str, ...] = (), *, hidden: int = 16, seed: int = 0
) -> tuple[Path, Path]:
    """Save a tiny random ``ViTModel`` and ``BertModel`` (+ tokenizer) with ``save_pretrained``.

    Returns the ``(image_encoder, text_encoder)`` folders. The vocabulary holds BERT's special
    tokens, ``words`` and the generator's filler words.
    """
    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    image_dir, text_dir = folder / "vit", folder / "bert"
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
        ),
    )
    vit.save_pretrained(image_dir)
    text_dir.mkdir(parents=True, exist_ok=True)
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ",",
        '"',
        *sorted({w for phrase in (*words, *_WORDS) for w in phrase.split()}),
    ]
    (text_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(text_dir / "vocab.txt")).save_pretrained(text_dir)
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
        ),
    )
    bert.save_pretrained(text_dir)
    return image_dir, text_dir
