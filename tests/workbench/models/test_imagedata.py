"""The image tasks read from package files: sizes and classes as the packages ship them, refused pickles, and
deterministic renders."""

from __future__ import annotations

import gzip
import io
import pickle

import numpy as np
import pytest
import torch

from nbmerge.errors import NBMergeError
from nbmerge.workbench.models import imagedata


@pytest.mark.parametrize("loader, count, classes, shape", [
    (imagedata.mnist, 5000, 10, (28, 28)),
    (imagedata.fashion, 70000, 10, (28, 28)),
    (imagedata.animals, 10000, 10, (28, 28)),
    (imagedata.digits, 1797, 10, (8, 8)),
])
def test_the_packaged_data_sets_load_whole(loader, count, classes, shape):
    data = loader()
    assert data.images.shape == (count, *shape) and data.images.dtype == np.uint8
    assert len(data.classes) == classes and sorted(set(data.labels.tolist())) == list(range(classes))
    assert data.images.max() > 200  # real ink, not an empty array


def test_emoji_tasks_label_groups_and_skin_tones():
    groups = imagedata.emoji()
    assert "Smileys & Emotion" in groups.classes and "Component" not in groups.classes
    assert groups.images.shape[1:] == (109, 109, 3) and len(groups.labels) > 1500
    tones = imagedata.skin_tone()
    assert tones.classes == ("light", "medium-light", "medium", "medium-dark", "dark")
    assert np.bincount(tones.labels).min() == np.bincount(tones.labels).max()  # every person emoji in all 5 tones
    # the same emoji in two tones differ only where the skin is drawn
    assert not np.array_equal(tones.images[0], tones.images[1])


def test_rendered_glyph_tasks_are_balanced_and_repeatable():
    letters = imagedata.letters(seed=1)
    assert len(letters.classes) == 26 and np.bincount(letters.labels).tolist() == [240] * 26
    assert np.array_equal(letters.images, imagedata.letters(seed=1).images)
    assert not np.array_equal(letters.images, imagedata.letters(seed=2).images)
    scripts = imagedata.scripts()
    assert scripts.classes[:3] == ("latin", "greek", "cyrillic") and scripts.images.shape[1:] == (48, 48)


def test_a_pickle_naming_anything_but_numpy_arrays_is_refused():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refused to load builtins.print"):
        imagedata._ArraysOnly(io.BytesIO(pickle.dumps(Evil()))).load()
    safe = imagedata._ArraysOnly(io.BytesIO(gzip.decompress(gzip.compress(pickle.dumps(np.arange(4)))))).load()
    assert safe.tolist() == [0, 1, 2, 3]


def test_as_tensor_gives_three_channels_of_one_size_in_the_unit_range():
    grey = np.zeros((2, 8, 8), dtype=np.uint8)
    grey[0, 2:6, 2:6] = 255
    tensor = imagedata.as_tensor(grey, 16)
    assert tensor.shape == (2, 3, 16, 16) and tensor.dtype == torch.float32
    assert torch.equal(tensor[:, 0], tensor[:, 2]) and tensor.max() == 1.0 and tensor.min() == 0.0
    colour = np.full((1, 32, 32, 3), (255, 0, 0), dtype=np.uint8)
    assert imagedata.as_tensor(colour, 16)[0, :, 5, 5].tolist() == [1.0, 0.0, 0.0]


def test_a_missing_debian_file_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(imagedata, "FASHION", tmp_path / "missing")
    monkeypatch.setitem(imagedata.DEBIAN_PACKAGES, tmp_path / "missing", "dataset-fashion-mnist")
    with pytest.raises(NBMergeError, match="apt-get install dataset-fashion-mnist"):
        imagedata.fashion()
