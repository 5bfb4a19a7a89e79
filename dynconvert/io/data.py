"""Datasets and preprocessing for fine-tuning and evaluation.

``--data`` takes:

- an ImageFolder tree (ImageNet layout): ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``, or a
  single ``DIR/<class>/*`` (used for both training and evaluation);
- a flat folder of images without class subfolders: *unlabeled* images, usable only for
  distillation from a teacher;
- ``digits``: scikit-learn's offline handwritten digits (1,797 8x8 images, 10 classes) upsampled
  to the model's input size, with a fixed stratified held-out test split (25%);
- ``fake``: random images and labels for smoke tests.

Images get the architecture's standard preprocessing: a torchvision model's own transform
(resize, center crop, mean/std) when the .dyn's recorded input size is its crop size; otherwise
the recorded input size with ImageNet statistics (3 channels) or mean 0.5 / std 0.5 (1 channel).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import DynError, first_line

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUILTIN = ("digits", "fake")
DIGITS_TEST_FRACTION = 0.25
CHECK_ALL_UP_TO = 2000  # folders this small are decoded in full before training starts
CHECK_SAMPLE = 200  # larger ones: this many random files up front, the rest when they are read


@dataclass(frozen=True)
class Preprocess:
    """What a model expects: channels, crop size, resize size and normalization."""

    channels: int
    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _head(self):
        from torchvision import transforms as T

        return [T.Grayscale(1)] if self.channels == 1 else [T.Lambda(lambda im: im.convert("RGB"))]

    def _tail(self):
        from torchvision import transforms as T

        return [T.ToTensor(), T.Normalize(self.mean, self.std)]

    def eval_transform(self):
        from torchvision import transforms as T

        return T.Compose(self._head() + [T.Resize(self.resize), T.CenterCrop(self.size)] + self._tail())

    def train_transform(self, augment: bool = True):
        from torchvision import transforms as T

        if not augment:
            return self.eval_transform()
        return T.Compose(self._head() + [T.RandomResizedCrop(self.size), T.RandomHorizontalFlip()] + self._tail())


def preprocess_for(source: dict | None, input_size) -> Preprocess:
    """The standard preprocessing of a model, from its recorded source and input size (C, H, W)."""
    c, h, _ = (int(v) for v in input_size)
    if source and source.get("kind") == "torchvision" and source.get("arch") and c == 3:
        import torchvision.models as tvm

        try:  # the weights' metadata holds the transform; nothing is downloaded
            t = tvm.get_model_weights(source["arch"]).DEFAULT.transforms()
            if int(t.crop_size[0]) == h:  # another recorded input size (e.g. 32 for CIFAR) wins below
                return Preprocess(3, h, int(t.resize_size[0]), tuple(t.mean), tuple(t.std))
        except (ValueError, AttributeError, KeyError):
            pass
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
    resize = round(h * 256 / 224) if h >= 64 else h
    return Preprocess(c, h, resize, mean, std)


@dataclass
class Data:
    """Training and evaluation sets opened from one ``--data`` value."""

    name: str
    train: Dataset | None
    val: Dataset | None
    num_classes: int | None  # None: unlabeled images
    labeled: bool = True

    def unlabeled(self) -> "Data":
        """The same images with their labels hidden (labels read as -1): distillation only."""
        train = Unlabeled(self.train) if self.train is not None else None
        return Data(self.name, train, self.val, self.num_classes, labeled=False)


class Unlabeled(Dataset):
    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i][0], -1


MAX_IMAGE_PIXELS = 89_478_485
"""Larger images are refused before they are decoded (PIL's own warning threshold, 1/4 GiB of
RGBA): a few-byte file can declare 20000 x 20000 pixels."""


def load_image(path: str):
    """PIL loader that names the file it cannot decode, refuses decompression bombs before decoding,
    and maps 16-bit grayscale to 8 bits (PIL would clip it at 255)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, by name
            img = Image.open(f)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DynError(f"image {path} declares {w} x {h} pixels, more than the {MAX_IMAGE_PIXELS:,} decoded "
                               "safely (a decompression bomb?); downscale it or remove it")
            img.load()
            return _eight_bit(path, img)
    except Image.DecompressionBombError:  # PIL's own refusal, at twice the limit, before the size is known
        raise DynError(f"image {path} declares more than {2 * MAX_IMAGE_PIXELS:,} pixels, more than the "
                       f"{MAX_IMAGE_PIXELS:,} decoded safely (a decompression bomb?); downscale it or remove it") from None
    except UnidentifiedImageError:
        raise DynError(f"cannot decode image {path} (not an image format PIL reads); remove or replace it") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DynError(f"cannot decode image {path} ({first_line(e)}); remove or replace it") from None


def _eight_bit(path: str, img):
    """An RGB or L image with 0-255 values: 16-bit grayscale scaled down (not clipped); 32-bit
    pixels, whose range no format defines, refused by name."""
    import numpy as np
    from PIL import Image

    sixteen = img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM"))  # PGM: 0-65535
    if sixteen:
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise DynError(f"image {path} has 16-bit pixels outside 0-65535 (corrupt); remove or replace it")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        kind = "32-bit floating-point" if img.mode == "F" else "32-bit integer"
        raise DynError(f"image {path} has {kind} pixels, whose value range is not defined; "
                       "save it as an 8- or 16-bit image, or remove it")
    return img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy()


class ImageFiles(Dataset):
    """A flat folder of images without labels (for distillation)."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(load_image(str(self.files[i]))), -1


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    if not any(p.is_dir() for p in root.iterdir()):
        raise DynError(f"{root} has no class subfolders; an ImageFolder tree is {root}/<class>/<image>")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_image)
    except FileNotFoundError as e:
        raise DynError(f"{root}: no images found in its class folders (looked for {', '.join(IMAGE_EXTS)}); {first_line(e)}") from None


def check_decodable(dataset: Dataset) -> None:
    """Decode every image of a small folder (a random sample of a big one) before training starts."""
    files = [s[0] for s in dataset.samples] if hasattr(dataset, "samples") else [str(p) for p in getattr(dataset, "files", [])]
    if len(files) > CHECK_ALL_UP_TO:
        files = random.Random(0).sample(files, CHECK_SAMPLE)
    for f in files:
        load_image(f)


def open_data(spec: str, pre: Preprocess, *, num_classes: int | None = None, augment: bool = True, fake_size: int = 64) -> Data:
    """Open ``--data``: 'digits', 'fake', an ImageFolder tree or a flat folder of unlabeled images."""
    if spec == "digits":
        return digits(pre)
    if spec == "fake":
        return fake(pre, num_classes or 10, fake_size)
    root = Path(spec)
    if not root.exists():
        raise DynError(f"--data {spec}: no such folder; give an ImageFolder tree (DIR/<class>/<image> or DIR/train + DIR/val), a folder of images, 'digits' or 'fake'")
    if not root.is_dir():
        raise DynError(f"--data {spec} is a file; give a folder of images (ImageFolder layout), 'digits' or 'fake'")
    entries = list(root.iterdir())
    if not entries:
        raise DynError(f"--data {spec} is an empty folder; put images in class subfolders ({spec}/<class>/<image>)")
    if (root / "train").is_dir() or (root / "val").is_dir():
        train = _image_folder(root / "train", pre.train_transform(augment)) if (root / "train").is_dir() else None
        val = _image_folder(root / "val", pre.eval_transform()) if (root / "val").is_dir() else None
        if train is not None and val is not None and train.classes != val.classes:
            raise DynError(f"--data {spec}: train/ has {len(train.classes)} classes but val/ has {len(val.classes)}; they must hold the same class folders")
        first = train or val
        data = Data(spec, train, val, len(first.classes))
    elif any(p.is_dir() for p in entries):
        train = _image_folder(root, pre.train_transform(augment))
        val = _image_folder(root, pre.eval_transform())
        data = Data(spec, train, val, len(train.classes))
    else:
        files = _images_in(root)
        if not files:
            raise DynError(f"--data {spec} holds no images (looked for {', '.join(IMAGE_EXTS)}) and no class subfolders")
        data = Data(spec, ImageFiles(files, pre.train_transform(augment)), None, None, labeled=False)
    for d in (data.train, data.val):
        if d is not None:
            check_decodable(d)
    return data


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), 8x8 in [0, 1]; a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def _digits_tensor(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    x = F.interpolate(x[:, None], size=(pre.size, pre.size), mode="bilinear", align_corners=False)
    x = x.repeat(1, pre.channels, 1, 1)
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return (x - mean) / std


def digits(pre: Preprocess) -> Data:
    xtr, ytr, xte, yte = digits_arrays()
    return Data("digits", TensorDataset(_digits_tensor(xtr, pre), ytr), TensorDataset(_digits_tensor(xte, pre), yte), 10)


def fake(pre: Preprocess, num_classes: int, size: int = 64) -> Data:
    g = torch.Generator().manual_seed(0)
    shape = (pre.channels, pre.size, pre.size)
    make = lambda n: TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g))
    return Data("fake", make(size), make(max(size // 2, 1)), num_classes)


def check_classes(data: Data, model_classes: int) -> None:
    """The data's class count must match the model's outputs."""
    if data.num_classes is not None and data.num_classes != model_classes:
        raise DynError(
            f"--data {data.name} has {data.num_classes} classes but the model predicts {model_classes}; "
            "use data with the model's classes (one subfolder per class)"
        )


def calibration_batches(spec: str, source: dict | None, input_size, images: int = 512, batch_size: int = 64) -> list[torch.Tensor]:
    """Up to ``images`` preprocessed images (eval transform, fixed random choice) from ``--calib``,
    in batches: the inputs a calibrated conversion fits layer outputs on. Labels are not used."""
    data = open_data(spec, preprocess_for(source, input_size), augment=False)
    dataset = data.train if data.train is not None else data.val
    if dataset is None or len(dataset) == 0:
        raise DynError(f"--calib {spec}: no images to calibrate on")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(dataset), generator=g)[:images].tolist()
    batches, current = [], []
    for i in order:
        item = dataset[i]
        current.append(item[0] if isinstance(item, (tuple, list)) else item)
        if len(current) == batch_size:
            batches.append(torch.stack(current))
            current = []
    if current:
        batches.append(torch.stack(current))
    return batches


MAX_INPUT_VALUES = 3 * 8192 * 8192
"""The most values one input image (C x H x W) may have: 768 MiB as float32."""


def check_input_size(size, what: str = "--input-size", hint: str = "give the size the model takes, e.g. 3,224,224"
                     ) -> tuple[int, int, int]:
    """An input size (C, H, W) as three positive integers of a size that can be allocated; a
    one-line DynError naming ``what`` (the flag, or the file whose metadata holds it) otherwise."""
    shown = ",".join(map(str, size)) if isinstance(size, (list, tuple)) else repr(size)
    if (not isinstance(size, (list, tuple)) or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DynError(f"{what} {shown} is not three positive integers C,H,W; {hint}")
    if math.prod(size) > MAX_INPUT_VALUES:
        raise DynError(f"{what} {shown} is {math.prod(size):,} values per image, more than the {MAX_INPUT_VALUES:,} "
                       f"allowed; {hint}")
    return tuple(size)


def parse_input_size(text: str, flag: str = "--input-size") -> tuple[int, int, int]:
    """``3,224,224`` -> (3, 224, 224), checked like every other input size."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise DynError(f"{flag} {text!r} must look like 3,224,224") from None
    return check_input_size(values, flag)


@torch.no_grad()
def probe_forward(model: torch.nn.Module, size, what: str = "--input-size") -> None:
    """Run ``model`` once on one zero image of ``size`` (C, H, W), before any long work: a model that
    does not run at that size is refused in one line, naming the size and where it came from."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.zeros(())).device
        model(torch.zeros(1, *size, device=device))
    except Exception as e:  # a user's forward may raise anything; its first line says what
        raise DynError(f"the model does not run on a {','.join(map(str, size))} input ({first_line(e)}); "
                       f"pass the size it takes with {what} C,H,W") from None
    finally:
        model.train(was_training)
