"""RandAugment for clips, as the official fine-tuning applies it (timm's `rand_augment_transform`
through VideoMAE's `create_random_augment`): every operation draws its magnitude and sign once
per clip and applies them identically to every frame.

`rand-m7-n4-mstd0.5-inc1` (the official default): 4 operations chosen uniformly with
replacement from the 15 "increasing" transforms, each applied with probability 0.5, magnitude
N(7, 0.5) clipped to [0, 10]; bicubic resampling and grey (128) fill for the geometric ones;
translations relative to the frame size (45% at magnitude 10).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (128, 128, 128)
_MAX_LEVEL = 10.0


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  magnitude: float = 7.0
  num_layers: int = 4
  magnitude_std: float = 0.5
  prob: float = 0.5
  increasing: bool = True

  @classmethod
  def parse(cls, text: str) -> "RandAugmentSpec":
    """timm's config string, e.g. `rand-m7-n4-mstd0.5-inc1`."""
    parts = text.split("-")
    if not parts or parts[0] != "rand":
      raise ValueError(f"RandAugment config {text!r} must start with 'rand-' (e.g. rand-m7-n4-mstd0.5-inc1)")
    kw = {}
    for p in parts[1:]:
      m = re.fullmatch(r"(mstd|inc|m|n|p)([\d.]+)", p)
      if not m:
        raise ValueError(f"RandAugment config {text!r}: unknown part {p!r} (m, n, mstd, inc, p)")
      key, val = m.groups()
      kw[{"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "inc": "increasing", "p": "prob"}[key]] = (
          int(val) if key == "n" else bool(int(val)) if key == "inc" else float(val))
    return cls(**kw)


def _signed(v: float, rng: np.random.Generator) -> float:
  return -v if rng.random() < 0.5 else v


def _affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=_FILL)


def _solarize_add(img, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


# name -> (level -> args (drawn once per clip), op(img, *args))
def _ops(increasing: bool):
  enhance = lambda cls: (lambda img, f: cls(img).enhance(f))  # noqa: E731
  if increasing:
    factor = lambda lv, rng: (1.0 + _signed(lv / _MAX_LEVEL * 0.9, rng),)  # noqa: E731
    posterize = lambda lv, rng: (4 - int(lv / _MAX_LEVEL * 4),)  # noqa: E731
    solarize = lambda lv, rng: (256 - int(lv / _MAX_LEVEL * 256),)  # noqa: E731
    suffix = "Increasing"
  else:
    factor = lambda lv, rng: (lv / _MAX_LEVEL * 1.8 + 0.1,)  # noqa: E731
    posterize = lambda lv, rng: (int(lv / _MAX_LEVEL * 4),)  # noqa: E731
    solarize = lambda lv, rng: (int(lv / _MAX_LEVEL * 256),)  # noqa: E731
    suffix = ""
  none = lambda lv, rng: ()  # noqa: E731
  return {
      "AutoContrast": (none, lambda img: ImageOps.autocontrast(img)),
      "Equalize": (none, lambda img: ImageOps.equalize(img)),
      "Invert": (none, lambda img: ImageOps.invert(img)),
      "Rotate": (lambda lv, rng: (_signed(lv / _MAX_LEVEL * 30.0, rng),),
                 lambda img, deg: img.rotate(deg, resample=Image.BICUBIC, fillcolor=_FILL)),
      "Posterize" + suffix: (posterize, lambda img, bits: img if bits >= 8 else ImageOps.posterize(img, max(bits, 0))),
      "Solarize" + suffix: (solarize, lambda img, thresh: ImageOps.solarize(img, thresh)),
      "SolarizeAdd": (lambda lv, rng: (int(lv / _MAX_LEVEL * 110),), _solarize_add),
      "Color" + suffix: (factor, enhance(ImageEnhance.Color)),
      "Contrast" + suffix: (factor, enhance(ImageEnhance.Contrast)),
      "Brightness" + suffix: (factor, enhance(ImageEnhance.Brightness)),
      "Sharpness" + suffix: (factor, enhance(ImageEnhance.Sharpness)),
      "ShearX": (lambda lv, rng: (_signed(lv / _MAX_LEVEL * 0.3, rng),), lambda img, s: _affine(img, (1, s, 0, 0, 1, 0))),
      "ShearY": (lambda lv, rng: (_signed(lv / _MAX_LEVEL * 0.3, rng),), lambda img, s: _affine(img, (1, 0, 0, s, 1, 0))),
      "TranslateXRel": (lambda lv, rng: (_signed(lv / _MAX_LEVEL * 0.45, rng),),
                        lambda img, pct: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0))),
      "TranslateYRel": (lambda lv, rng: (_signed(lv / _MAX_LEVEL * 0.45, rng),),
                        lambda img, pct: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]))),
  }


class ClipRandAugment:
  """Callable (clip uint8 (T, H, W, 3), rng) -> augmented clip, the same ops for every frame."""

  def __init__(self, spec: RandAugmentSpec | str):
    self.spec = RandAugmentSpec.parse(spec) if isinstance(spec, str) else spec
    self.ops = _ops(self.spec.increasing)
    self.names = sorted(self.ops)

  def plan(self, rng: np.random.Generator) -> list[tuple[str, tuple]]:
    """The operations of one clip with their arguments (what every frame gets)."""
    s = self.spec
    out = []
    for name in rng.choice(self.names, s.num_layers, replace=True):
      if s.prob < 1.0 and rng.random() > s.prob:
        continue
      level = s.magnitude
      if s.magnitude_std > 0:
        level = rng.uniform(0, level) if s.magnitude_std == float("inf") else rng.normal(level, s.magnitude_std)
      level = float(np.clip(level, 0.0, _MAX_LEVEL))
      out.append((str(name), self.ops[name][0](level, rng)))
    return out

  def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    plan = self.plan(rng)
    if not plan:
      return clip
    frames = []
    for frame in clip:
      img = Image.fromarray(frame)
      for name, args in plan:
        img = self.ops[name][1](img, *args)
      frames.append(np.asarray(img.convert("RGB")))
    return np.stack(frames)
