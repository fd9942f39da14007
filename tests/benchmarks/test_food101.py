import pytest
import torch

from benchmarks.data.food101 import (
    extract_food101_features,
    load_food101,
    read_titles_csv,
    write_food101,
    write_tiny_encoders,
)
from benchmarks.data.pickles import DataFormatError

CLASSES = ("apple_pie", "breakfast_burrito", "donuts")


@pytest.mark.parametrize("header", [True, False])
def test_loader_reads_what_the_generator_wrote(tmp_path, header):
    root = write_food101(tmp_path, CLASSES, n_per_class=(4, 2), header=header)
    train, test = load_food101(root, "train"), load_food101(root, "test")
    assert (len(train), len(test)) == (12, 6)  # the unclosed quote swallowed no row
    assert train.classes == sorted(CLASSES)
    assert train.labels.count(0) == 4
    assert train.titles[1].endswith("apple pie, with a comma")  # unclosed quote kept as text
    assert train.titles[2].endswith("apple pie, quoted")  # a properly quoted title with a comma
    assert all(p.is_file() for p in train.image_paths)
    first = (tmp_path / "texts" / "train_titles.csv").read_text().splitlines()[0]
    assert first.startswith("Image_path") == header


@pytest.mark.parametrize("header", [True, False])
def test_loader_reads_windows_line_ends_and_a_byte_order_mark(tmp_path, header):
    root = write_food101(tmp_path, CLASSES, n_per_class=(2, 1), header=header)
    csv = root / "texts" / "train_titles.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes().replace(b"\n", b"\r\n"))
    split = load_food101(root, "train")
    assert len(split) == 6 and split.image_paths[0].name == "apple_pie_0.jpg"
    assert not any(t.endswith("\r") for t in split.titles)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/train"):
        load_food101(tmp_path, "train")
    with pytest.raises(ValueError, match="no official valid"):
        load_food101(tmp_path, "valid")
    root = write_food101(tmp_path / "a", CLASSES, n_per_class=(2, 1))
    csv = root / "texts" / "test_titles.csv"
    csv.write_text(csv.read_text() + "pizza_1.jpg,a pizza,pizza\n")
    with pytest.raises(DataFormatError, match="class 'pizza'"):
        load_food101(root, "test")
    (root / "images" / "train" / "donuts" / "donuts_0.jpg").unlink()
    with pytest.raises(DataFormatError, match=r"1 images .* missing"):
        load_food101(root, "train")
    bad = tmp_path / "bad.csv"
    bad.write_text("x.jpg,no label column\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:1"):
        read_titles_csv(bad)
    with pytest.raises(FileNotFoundError, match=r"titles file not found: .*nope\.csv"):
        read_titles_csv(tmp_path / "nope.csv")
    (tmp_path / "empty" / "images" / "train").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no class folders in"):
        load_food101(tmp_path / "empty", "train")


def test_loader_skips_blank_lines(tmp_path):
    root = write_food101(tmp_path, CLASSES, n_per_class=(2, 1))
    csv = root / "texts" / "train_titles.csv"
    csv.write_text(csv.read_text().replace("\n", "\n\n", 2) + "\n   \n")
    assert len(load_food101(root, "train")) == 6


def test_feature_extraction_from_local_transformers_models(tmp_path):
    root = write_food101(tmp_path / "food", CLASSES, n_per_class=(3, 1))
    words = tuple(c.replace("_", " ") for c in CLASSES)
    image_dir, text_dir = write_tiny_encoders(tmp_path / "enc", words, hidden=8)
    data = load_food101(root, "train")
    batch = extract_food101_features(data, image_dir, text_dir, max_text_len=10, batch_size=4)
    assert batch["image"].shape == (9, 1 + (32 // 8) ** 2, 8)  # CLS + 16 patches
    assert batch["text"].shape == (9, 10, 8)
    assert batch.padding_mask("text").any() and not batch.padding_mask("text")[:, 0].any()
    assert batch.target.tolist() == data.labels
    # the class name reaches the tokenizer as known words, not [UNK]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(text_dir)("apple pie")["input_ids"]
    assert 1 not in ids  # [UNK] is id 1
    torch.testing.assert_close(
        batch["text"], extract_food101_features(data, image_dir, text_dir, max_text_len=10)["text"]
    )


def test_feature_extraction_never_reads_a_missing_folder_as_a_hub_id(tmp_path):
    root = write_food101(tmp_path / "food", CLASSES, n_per_class=(1, 1))
    vit, bert = write_tiny_encoders(tmp_path / "enc")
    split = load_food101(root, "test")
    with pytest.raises(FileNotFoundError, match=r"image encoder: no config\.json in .*nowhere"):
        extract_food101_features(split, tmp_path / "nowhere", bert)
    with pytest.raises(FileNotFoundError, match=r"text encoder: no config\.json in .*nowhere"):
        extract_food101_features(split, vit, tmp_path / "nowhere")


def test_loader_keeps_at_most_k_images_per_class_by_a_seeded_draw(tmp_path):
    root = write_food101(tmp_path, CLASSES, n_per_class=(6, 1))
    full = load_food101(root, "train")
    some = load_food101(root, "train", max_per_class=2, seed=3)
    assert [some.labels.count(c) for c in range(3)] == [2, 2, 2]
    assert some.classes == full.classes
    rows = {p: (t, y) for p, t, y in zip(full.image_paths, full.titles, full.labels, strict=True)}
    assert all(
        rows[p] == (t, y)
        for p, t, y in zip(some.image_paths, some.titles, some.labels, strict=True)
    )
    order = [full.image_paths.index(p) for p in some.image_paths]
    assert order == sorted(order)
    again = load_food101(root, "train", max_per_class=2, seed=3)
    assert again.image_paths == some.image_paths
    draws = {
        tuple(load_food101(root, "train", max_per_class=2, seed=s).image_paths) for s in range(5)
    }
    assert len(draws) > 1
    assert len(load_food101(root, "train", max_per_class=50)) == len(full)
    with pytest.raises(ValueError, match="max_per_class must be a positive"):
        load_food101(root, "train", max_per_class=0)


def test_feature_extraction_uses_the_saved_image_processor(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor, ViTModel

    root = write_food101(tmp_path / "food", CLASSES, n_per_class=(1, 1))
    vit, bert = write_tiny_encoders(tmp_path / "enc", hidden=8)
    split = load_food101(root, "test")
    default = extract_food101_features(split, vit, bert, max_text_len=6)
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    )
    processor.save_pretrained(vit)
    seen = []
    batch = extract_food101_features(
        split, vit, bert, max_text_len=6, progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(3, 3)]
    with torch.no_grad():
        pixels = processor(
            images=[Image.open(p).convert("RGB") for p in split.image_paths], return_tensors="pt"
        )["pixel_values"]
        expected = ViTModel.from_pretrained(vit).eval()(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(batch["image"], expected)
    assert not torch.allclose(batch["image"], default["image"])
    torch.testing.assert_close(batch["text"], default["text"])


def test_feature_extraction_reads_greyscale_images_and_names_an_unreadable_one(tmp_path):
    from PIL import Image

    root = write_food101(tmp_path / "food", CLASSES, n_per_class=(1, 1))
    vit, bert = write_tiny_encoders(tmp_path / "enc", hidden=8)
    split = load_food101(root, "test")
    first = split.image_paths[0]
    Image.open(first).convert("L").save(first, format="JPEG")  # greyscale, as some release images
    assert extract_food101_features(split, vit, bert, max_text_len=6)["image"].isfinite().all()
    split.image_paths[1].write_bytes(b"<html>404 not found</html>")  # a failed download
    with pytest.raises(
        DataFormatError, match=rf"cannot read the image .*{split.image_paths[1].name}"
    ):
        extract_food101_features(split, vit, bert, max_text_len=6)
    empty = load_food101(root, "test", max_per_class=1)
    empty.image_paths, empty.titles, empty.labels = [], [], []
    with pytest.raises(ValueError, match="holds no image"):
        extract_food101_features(empty, vit, bert)
