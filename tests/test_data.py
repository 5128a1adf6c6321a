import pytest
import torch

from resalign_fast.data.digits import (
    all_captions,
    benign_subset,
    caption,
    digits_split,
    digits_world,
    load_digit_images,
)
from resalign_fast.data.sets import DataError, load_image_folder


def test_digits_images_and_split():
    x, y = load_digit_images(16)
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    tr, ytr = digits_split("train")
    te, yte = digits_split("test")
    assert len(ytr) + len(yte) == 1797 and len(yte) == 359
    # disjoint: no test image equals a train image at the same position of the full set
    assert torch.equal(digits_split("train")[0], tr)


def test_world_sets_exclude_the_concept():
    w = digits_world(concept=7)
    assert (w["harmful"].labels == 7).all() and len(w["harmful"]) > 100
    for k in ("preserve", "ft"):
        assert (w[k].labels != 7).all()
    assert all("seven" in p or "7" in p for p in w["harmful"].prompts)
    w3 = digits_world(concept=3)
    assert (w3["harmful"].labels == 3).all() and (w3["ft"].labels != 3).all()
    assert (benign_subset("benign-all", concept=7).labels != 7).all()
    assert (benign_subset("digit-2").labels == 2).all()
    with pytest.raises(ValueError, match="unknown digits subset"):
        benign_subset("cats")
    with pytest.raises(ValueError, match="concept"):
        digits_world(concept=12)


def test_captions():
    assert caption(7, 0) == "a handwritten digit seven"
    assert len(set(all_captions(3))) == len(all_captions(3)) >= 4


def _write_folder(tmp_path, rows, images):
    from PIL import Image

    for name, mode, size in images:
        Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(tmp_path / name)
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f"{a},{b}\n" for a, b in rows)
    )


def test_image_folder_modes_sizes_and_skips(tmp_path):
    _write_folder(
        tmp_path,
        [("a.png", "grey"), ("b.png", "rgba"), ("c.png", "corrupt"), ("d.png", "missing")],
        [("a.png", "L", (20, 30)), ("b.png", "RGBA", (64, 48))],
    )
    (tmp_path / "c.png").write_bytes(b"not a png")
    s = load_image_folder(tmp_path, resolution=16, channels=3)
    assert s.images.shape == (2, 3, 16, 16) and s.prompts == ["grey", "rgba"]
    assert {n for n, _ in s.skipped} == {"c.png", "d.png"}
    assert torch.allclose(
        s.images[0], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1.01 / 127.5
    )  # bicubic: +-1 level


@pytest.mark.parametrize(
    "meta, msg",
    [
        (None, "missing"),
        ("name,text\na.png,x\n", "file_name"),
        ("file_name,label\na.png,x\n", "caption column"),
        ("file_name,text\n", "no rows"),
    ],
)
def test_image_folder_metadata_errors(tmp_path, meta, msg):
    if meta is not None:
        (tmp_path / "metadata.csv").write_text(meta)
    with pytest.raises(DataError, match=msg):
        load_image_folder(tmp_path, 16)


def test_image_folder_nothing_usable(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,a\n")
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no usable image"):
        load_image_folder(tmp_path, 16)
