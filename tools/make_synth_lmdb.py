"""Render the embedded synthetic word-image LMDBs (`make data`).

Writes, deterministically from --seed, under --out (default `data`):
  train_data_lmdb/CVPR2016    SynthText-like: colour, textured or photo-like backgrounds, rotation (JPEG)
  train_data_lmdb/NIPS2014    MJSynth-like: clean backgrounds, many fonts, blur and noise (JPEG)
  valid_data_lmdb/synth_valid both styles, training fonts, for validation during training (PNG)
  test_data_lmdb/synth_seen_fonts    both styles, training fonts (PNG)
  test_data_lmdb/synth_unseen_fonts  both styles, fonts the training sets never use (PNG)

With --target STYLE it writes a target-domain root instead (`make target-data`: --target signage
--out data/target), in a style the source sets never show:
  train_data_lmdb/STYLE         the pool, --num_pool labelled words (JPEG); the loop's
                                --label_ratio splits it into the labelled seed and the pool
  valid_data_lmdb/STYLE_valid   --num_valid words for choosing settings (PNG)
  test_data_lmdb/STYLE_test     --num_test words for reporting only (PNG)
All three draw from every font, the held-out ones included: the target brings typefaces too.
Target styles: `curved` (arcs and waves), `perspective` (one end farther away), `cluttered` (parts of
neighbouring lines, rules and poles in the crop), `lowres` (16-24 pixels high, low JPEG quality) and
`signage`, which mixes them at the strengths in SIGNAGE.

Words come from the `english-words` package (GCIDE list), else /usr/share/dict/words; fonts from
matplotlib's bundled TTFs plus any usable TTF/OTF under the system font folders. Labels are stored
in mixed case. Every sample draws from its own generator seeded by (seed, set number, index), so the
output does not depend on the number of worker processes."""
import argparse
import functools
import glob
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safe_files import atomic_io  # noqa: E402  (the repo root is on sys.path only from here)
from data_layer import lmdb_writing  # noqa: E402
import options  # noqa: E402
import utils  # noqa: E402

SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"))
# Symbol, math and placeholder fonts map ASCII codes to non-letter glyphs.
FONT_DENYLIST = ("Sym", "NonUni", "cmex", "cmsy", "cmmi", "LastResort", "Display", "Math")
# Typefaces held out of training, for the unseen-fonts evaluation set.
UNSEEN_FONT_PREFIXES = ("STIXGeneral", "cmti")
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PUNCTUATION_FORMS = ("{a}-{b}", "{a}'s", "{a}.", "{a}!", "{a}&{b}", "{a}:", "{a},", "({a})")


# ---------------------------------------------------------------- resources

def font_files():
    """Candidate TTF/OTF paths: matplotlib's bundled fonts, then system ones (deduplicated by name)."""
    import matplotlib

    paths = sorted(glob.glob(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "*.ttf")))
    for folder in SYSTEM_FONT_DIRS:
        for ext in ("ttf", "otf"):
            paths.extend(sorted(glob.glob(os.path.join(folder, "**", f"*.{ext}"), recursive=True)))
    unique = {}
    for path in paths:
        unique.setdefault(os.path.basename(path), path)
    return [unique[name] for name in sorted(unique)]


def renders_latin(path):
    """Whether the font draws distinct, non-empty glyphs for all letters and digits."""
    try:
        font = ImageFont.truetype(path, 24, layout_engine=ImageFont.Layout.BASIC)
        masks = set()
        for ch in LETTERS + LETTERS.upper() + DIGITS:
            mask = font.getmask(ch)
            if mask.size[0] == 0 or mask.getbbox() is None:
                return False
            masks.add(bytes(mask))
        return len(masks) == 2 * len(LETTERS) + len(DIGITS)
    except Exception:  # a broken font file is simply not used
        return False


@functools.lru_cache(maxsize=1)
def available_fonts():
    """All usable fonts, sorted by file name."""
    return tuple(p for p in font_files() if not any(bad in os.path.basename(p) for bad in FONT_DENYLIST)
                 and renders_latin(p))


def split_fonts(fonts=None):
    """`(seen, unseen)`: training fonts and the held-out typefaces."""
    fonts = available_fonts() if fonts is None else fonts
    unseen = [f for f in fonts if os.path.basename(f).startswith(UNSEEN_FONT_PREFIXES)]
    seen = [f for f in fonts if f not in unseen]
    if not seen or not unseen:
        raise utils.UserError("no usable fonts found for the seen/unseen split; install matplotlib (it ships "
                              "DejaVu, STIX and Computer Modern TTFs)")
    return seen, unseen


@functools.lru_cache(maxsize=1)
def load_words():
    """A real English word list, sorted for determinism."""
    try:
        from english_words import get_english_words_set

        words = get_english_words_set(["gcide"], alpha=True)
    except ImportError:
        words = set()
        if os.path.isfile("/usr/share/dict/words"):
            with open("/usr/share/dict/words", encoding="utf-8", errors="ignore") as f:
                words = {w.strip() for w in f if w.strip().isalpha()}
    words = sorted(w for w in words if w.isascii() and 1 <= len(w) <= 18)
    if not words:
        raise utils.UserError("no word list: pip install english-words (or provide /usr/share/dict/words)")
    return tuple(words)


@functools.lru_cache(maxsize=256)
def get_font(path, size):
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


# ---------------------------------------------------------------- labels

def apply_case(text, rng):
    r = rng.random()
    if r < 0.45:
        return text.lower()
    if r < 0.80:
        return text[:1].upper() + text[1:].lower()
    return text.upper()


def random_number(rng):
    return "".join(rng.choice(list(DIGITS), size=int(rng.integers(1, 7))))


def make_label(rng, words):
    """A mixed-case label: mostly dictionary words, also numbers, random strings and a few with
    punctuation (those fall outside the default charset and exercise filtering)."""
    r = rng.random()
    word = words[int(rng.integers(len(words)))]
    if r < 0.68:
        return apply_case(word, rng)
    if r < 0.80:
        return random_number(rng)
    if r < 0.90:
        alphabet = list(LETTERS + LETTERS.upper() + DIGITS)
        return "".join(rng.choice(alphabet, size=int(rng.integers(2, 11))))
    if r < 0.97:
        if rng.random() < 0.7:
            return apply_case(word, rng) + random_number(rng)
        return random_number(rng) + word.lower()
    other = words[int(rng.integers(len(words)))]
    form = PUNCTUATION_FORMS[int(rng.integers(len(PUNCTUATION_FORMS)))]
    return apply_case(form.format(a=word, b=other), rng)


# ---------------------------------------------------------------- rendering

def text_mask(text, font, rng):
    """Greyscale coverage mask of the text with a little padding; sometimes with extra tracking."""
    ascent, descent = font.getmetrics()
    height = ascent + descent
    tracking = rng.uniform(0, 0.15) * font.size if rng.random() < 0.3 else 0.0
    if tracking:
        advances = [font.getlength(ch) + tracking for ch in text]
        width = int(sum(advances)) + 2
    else:
        width = int(font.getlength(text)) + 2
    pad = height // 3
    mask = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
    draw = ImageDraw.Draw(mask)
    if tracking:
        x = pad
        for ch, adv in zip(text, advances):
            draw.text((x, pad), ch, font=font, fill=255)
            x += adv
    else:
        draw.text((pad, pad), text, font=font, fill=255)
    return mask


def crop_to_ink(mask, rng, margin):
    """Crop the mask to its ink box plus random margins (fractions of the ink height)."""
    box = mask.getbbox() or (0, 0, mask.width, mask.height)
    h = box[3] - box[1]
    m = [int(rng.uniform(*margin) * h) for _ in range(4)]
    left, top = box[0] - m[0], box[1] - m[1]
    right, bottom = box[2] + m[2], box[3] + m[3]
    return mask.crop((left, top, right, bottom))  # outside the image crop fills with 0 (no ink)


def shear(mask, amount):
    """Horizontal shear (italic-like slant) by `amount` pixels per pixel of height."""
    width = mask.width + int(abs(amount) * mask.height) + 1
    shift = -amount * mask.height if amount > 0 else 0.0  # keeps every input column inside the output
    return mask.transform((width, mask.height), Image.AFFINE, (1, amount, shift, 0, 1, 0), resample=Image.BILINEAR)


def smooth_field(rng, size, cells, low, high, channels=3):
    """Random colour field: a coarse random grid upsampled bicubically (photo-like gradients)."""
    grid = rng.uniform(low, high, size=(cells[1], cells[0], channels)).astype(np.uint8)
    return Image.fromarray(grid.squeeze(), "RGB" if channels == 3 else "L").resize(size, Image.BICUBIC)


def textured_background(rng, size):
    """SynthText-like background: smooth colours with stripes, speckle or blurred shapes."""
    w, h = size
    base = np.asarray(smooth_field(rng, size, (int(rng.integers(2, 6)), int(rng.integers(2, 4))), 0, 255),
                      dtype=np.float32)
    kind = rng.integers(4)
    if kind == 0:  # stripes / wood-grain-like
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(0.05, 0.5)
        yy, xx = np.mgrid[0:h, 0:w]
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 6.3))
        base += wave[..., None] * rng.uniform(10, 50) * rng.uniform(-1, 1, size=3)
    elif kind == 1:  # speckle texture
        small = rng.normal(0, rng.uniform(10, 40), size=(max(h // 3, 1), max(w // 3, 1))).astype(np.float32)
        base += np.asarray(Image.fromarray(small, "F").resize(size, Image.BILINEAR))[..., None]
    elif kind == 2:  # blurred shapes, like out-of-focus objects in a photo
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
            x1, y1 = x0 + rng.uniform(0.1, 0.8) * w, y0 + rng.uniform(0.2, 1.2) * h
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        base = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4))), dtype=np.float32)
    base += rng.normal(0, rng.uniform(0, 8), size=base.shape)
    # Pull colours toward grey: fully saturated random fields make many words unreadable.
    grey = base.mean(axis=2, keepdims=True)
    base = grey + rng.uniform(0.25, 0.9) * (base - grey)
    return np.clip(base, 0, 255)


def contrasting_colour(rng, background, min_gap=90.0):
    """An RGB colour whose luminance differs from the background's mean by at least min_gap."""
    lum = float(np.mean(background @ np.array([0.299, 0.587, 0.114], dtype=np.float32)))
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if abs(float(colour @ np.array([0.299, 0.587, 0.114])) - lum) >= min_gap:
            return colour.astype(np.float32)
    return np.full(3, 0.0 if lum > 127 else 255.0, dtype=np.float32)


def compose(background, colour, alpha):
    """Blend a flat colour into the background through an alpha mask in [0, 1]."""
    a = alpha[..., None]
    return background * (1 - a) + colour[None, None, :] * a


def resize_to_height(img, height):
    width = max(1, round(img.width * height / img.height))
    return img.resize((width, height), Image.BICUBIC)


def render_cvpr2016(text, rng, fonts):
    font = get_font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(26, 44)))
    mask = text_mask(text, font, rng)
    angle = rng.normal(0, 5) if rng.random() < 0.8 else rng.uniform(-15, 15)
    mask = mask.rotate(angle, resample=Image.BICUBIC, expand=True)
    mask = crop_to_ink(mask, rng, (0.05, 0.35))
    background = textured_background(rng, mask.size)
    alpha = np.asarray(mask, dtype=np.float32) / 255.0 * rng.uniform(0.85, 1.0)
    colour = contrasting_colour(rng, background)
    if rng.random() < 0.25:  # outline or drop shadow in a second colour
        edge = mask.filter(ImageFilter.MaxFilter(3))
        if rng.random() < 0.5:  # drop shadow: shift without wrapping around
            shifted = Image.new("L", edge.size, 0)
            shifted.paste(edge, (int(rng.integers(1, 3)), int(rng.integers(1, 3))))
            edge = shifted
        edge_alpha = np.asarray(edge, dtype=np.float32) / 255.0
        background = compose(background, contrasting_colour(rng, colour[None, None, :], 90), edge_alpha)
    image = compose(background, colour, alpha)
    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return resize_to_height(img, int(rng.integers(26, 41)))


def render_nips2014(text, rng, fonts):
    font = get_font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(28, 44)))
    mask = text_mask(text, font, rng)
    if rng.random() < 0.3:
        mask = shear(mask, rng.uniform(-0.25, 0.25))
    if rng.random() < 0.5:
        mask = mask.rotate(rng.normal(0, 2), resample=Image.BICUBIC, expand=True)
    mask = crop_to_ink(mask, rng, (0.02, 0.25))
    h, w = mask.height, mask.width
    dark_text = rng.random() < 0.7
    bg_level = rng.uniform(150, 255) if dark_text else rng.uniform(0, 100)
    fg_level = rng.uniform(0, bg_level - 90) if dark_text else rng.uniform(bg_level + 90, 255)
    background = np.full((h, w, 3), bg_level, dtype=np.float32)
    if rng.random() < 0.5:  # gentle gradient
        background += np.linspace(-1, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(0, 30)
    tint = rng.uniform(-25, 25, size=3) if rng.random() < 0.4 else np.zeros(3)
    background += tint
    colour = np.full(3, fg_level, dtype=np.float32) + tint * rng.uniform(0, 2)
    if rng.random() < 0.15:  # border
        edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), dtype=np.float32) / 255.0
        background = compose(background, np.full(3, (bg_level + fg_level) / 2, dtype=np.float32), edge)
    image = compose(background, colour, np.asarray(mask, dtype=np.float32) / 255.0)
    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    img = resize_to_height(img, 32)
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 10), size=(img.height, img.width, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def render_mixed(text, rng, fonts):
    style = "cvpr2016" if rng.random() < 0.5 else "nips2014"
    return RENDERERS[style](text, rng, fonts)


# ---------------------------------------------------------------- target styles (a shifted domain)
# Degradations a recognizer trained on the two source styles above has not seen: perspective,
# curved baselines, clutter at the crop's edges and low resolution. `signage` combines them and is
# the target domain of `--target` (docs/pretrained-domain.md says how its strength was chosen).

def bilinear_sample(array, src_x, src_y):
    """Sample a 2-D float array at fractional source coordinates; outside the array reads 0."""
    h, w = array.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = array
    x = np.clip(src_x + 1, 0, w + 1)
    y = np.clip(src_y + 1, 0, h + 1)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h)
    fx, fy = x - x0, y - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def curve(mask, rng, strength):
    """Bend the baseline along an arc or a wave whose height is up to `strength` text heights; each
    column moves vertically and leans with the local slope, as text printed on a curved surface."""
    w, h = mask.size
    # short words bend less: a whole arc over three letters makes a blob no reader would call text
    amplitude = rng.uniform(0.4, 1.0) * strength * h * min(1.0, w / (4.0 * h)) * (1 if rng.random() < 0.5 else -1)
    t = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    if rng.random() < 0.6:  # an arc, as on a round sign or a bottle
        offset = amplitude * (t ** 2)
    else:  # a wave, as on cloth or a flag
        offset = amplitude * np.sin(np.pi * rng.uniform(0.6, 1.4) * t + rng.uniform(0, 2 * np.pi))
    offset -= offset.min()
    slope = np.gradient(offset)  # pixels per pixel: columns lean with the baseline
    out_h = h + int(np.ceil(offset.max())) + 1
    yy, xx = np.mgrid[0:out_h, 0:w].astype(np.float32)
    centre = h / 2.0
    src_y = yy - offset[None, :]
    src_x = xx + (src_y - centre) * slope[None, :]
    out = bilinear_sample(np.asarray(mask, dtype=np.float32), src_x, src_y)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def perspective_coefficients(out_points, in_points):
    """The 8 coefficients of PIL's PERSPECTIVE transform that map each out point to its in point."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(out_points, in_points):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(float(c) for c in np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)))


def perspective(mask, rng, strength):
    """View the text plane from the side: one end up to `strength` of the height shorter than the
    other, with the corners jittered and the whole tilted a little."""
    w, h = mask.size
    shrink = rng.uniform(0.3, 1.0) * strength * h
    near_left = rng.random() < 0.5
    jitter = rng.uniform(-0.12, 0.12, size=(4, 2)) * h
    tilt = rng.normal(0, 0.08) * w
    # out corners (top-left, top-right, bottom-right, bottom-left) before shifting into the canvas
    top_l, bot_l = (shrink / 2, h - shrink / 2) if not near_left else (0.0, float(h))
    top_r, bot_r = (0.0, float(h)) if not near_left else (shrink / 2, h - shrink / 2)
    corners = np.array([[0, top_l - tilt / 2], [w, top_r + tilt / 2], [w, bot_r + tilt / 2], [0, bot_l - tilt / 2]],
                       dtype=np.float64) + jitter
    corners -= corners.min(axis=0)
    size = tuple(int(np.ceil(v)) + 1 for v in corners.max(axis=0))
    coeffs = perspective_coefficients(corners, [(0, 0), (w, 0), (w, h), (0, h)])
    return mask.transform(size, Image.PERSPECTIVE, coeffs, resample=Image.BICUBIC)


def clutter(image, rng, fonts, words, text_height):
    """Things a loose crop catches: parts of the lines above and below, and strokes (borders, poles,
    underlines) across or beside the word, in their own colours."""
    img = image.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for edge in ("top", "bottom"):
        if rng.random() < 0.6:
            font = get_font(fonts[int(rng.integers(len(fonts)))], max(8, int(text_height * rng.uniform(0.7, 1.2))))
            other = words[int(rng.integers(len(words)))]
            ascent, descent = font.getmetrics()
            visible = rng.uniform(0.15, 0.4) * (ascent + descent)  # never enough to be read as a word
            y = -(ascent + descent) + visible if edge == "top" else h - visible
            x = rng.uniform(-0.3, 0.3) * w
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.text((x, y), other * 3, font=font, fill=colour)
    for _ in range(int(rng.integers(0, 3))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, max(2, h // 10) + 1))
        if rng.random() < 0.5:  # a horizontal rule near the top or bottom
            y = rng.choice([rng.uniform(0, 0.15), rng.uniform(0.85, 1.0)]) * h
            draw.line((0, y, w, y + rng.normal(0, 2)), fill=colour, width=width)
        else:  # an upright stroke at one end
            x = rng.choice([rng.uniform(0, 0.06), rng.uniform(0.94, 1.0)]) * w
            draw.line((x, 0, x + rng.normal(0, 2), h), fill=colour, width=width)
    return img


def low_resolution(img, rng, lowest, highest):
    """Shrink to a height of `lowest`..`highest` pixels, JPEG at low quality, and scale back to 32:
    a far-away or heavily compressed word."""
    small = resize_to_height(img, int(rng.integers(lowest, highest + 1)))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=int(rng.integers(20, 60)))
    buf.seek(0)
    return resize_to_height(Image.open(buf).convert("RGB"), 32)


# Strength of each degradation in the `signage` style. Chosen by measurement: the source-trained
# start (`make pretrain`) must read 40-80% of the target's test words (docs/pretrained-domain.md).
SIGNAGE = {"curve": 0.25, "perspective": 0.35, "p_curve": 0.25, "p_perspective": 0.35,
           "p_clutter": 0.5, "p_lowres": 0.2, "lowres": (16, 24)}


def render_degraded(text, rng, fonts, geometry, p_clutter, p_lowres):
    """A source-like word (textured or plain background) after the given degradations."""
    font = get_font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(26, 44)))
    mask = text_mask(text, font, rng)
    ascent, descent = font.getmetrics()
    for warp in geometry:
        mask = warp(mask, rng)
    mask = crop_to_ink(mask, rng, (0.05, 0.3))
    alpha = np.asarray(mask, dtype=np.float32) / 255.0 * rng.uniform(0.85, 1.0)
    if rng.random() < 0.5:
        background = textured_background(rng, mask.size)
    else:
        background = np.full((mask.height, mask.width, 3), rng.uniform(0, 255), dtype=np.float32)
        background += rng.uniform(-25, 25, size=3)
    colour = contrasting_colour(rng, background)
    img = Image.fromarray(np.clip(compose(background, colour, alpha), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < p_clutter:
        img = clutter(img, rng, fonts, load_words(), ascent + descent)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < p_lowres:
        return low_resolution(img, rng, *SIGNAGE["lowres"])
    return resize_to_height(img, 32)


def render_curved(text, rng, fonts):
    return render_degraded(text, rng, fonts, [lambda m, r: curve(m, r, SIGNAGE["curve"])], 0.0, 0.0)


def render_perspective(text, rng, fonts):
    return render_degraded(text, rng, fonts, [lambda m, r: perspective(m, r, SIGNAGE["perspective"])], 0.0, 0.0)


def render_cluttered(text, rng, fonts):
    return render_degraded(text, rng, fonts, [], 1.0, 0.0)


def render_lowres(text, rng, fonts):
    return render_degraded(text, rng, fonts, [], 0.0, 1.0)


def render_signage(text, rng, fonts):
    geometry = []
    if rng.random() < SIGNAGE["p_curve"]:
        geometry.append(lambda m, r: curve(m, r, SIGNAGE["curve"]))
    if rng.random() < SIGNAGE["p_perspective"]:
        geometry.append(lambda m, r: perspective(m, r, SIGNAGE["perspective"]))
    return render_degraded(text, rng, fonts, geometry, SIGNAGE["p_clutter"], SIGNAGE["p_lowres"])


RENDERERS = {"cvpr2016": render_cvpr2016, "nips2014": render_nips2014, "mixed": render_mixed,
             "curved": render_curved, "perspective": render_perspective, "cluttered": render_cluttered,
             "lowres": render_lowres, "signage": render_signage}
# Image encoding per set: JPEG like the real training sets (and 4x smaller than PNG on these noisy
# crops); the evaluation sets in PNG so that both decoders are exercised.
FORMATS = {"cvpr2016": "JPEG", "nips2014": "JPEG", "mixed": "PNG"}
TARGET_STYLES = ("signage", "curved", "perspective", "cluttered", "lowres")


def get_renderer(style):
    if style not in RENDERERS:
        raise utils.UserError(f"style {style!r}: unknown; choose one of {', '.join(RENDERERS)}")
    return RENDERERS[style]


def render_word(text, style, rng, fonts=None):
    """Render `text` in the given style with numpy Generator `rng`; returns an RGB PIL image."""
    fonts = list(fonts) if fonts is not None else split_fonts()[0]
    return get_renderer(style)(text, rng, fonts)


def encode_image(img, fmt, rng):
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------- sets

def sample_rng(seed, index):
    seed = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
    return np.random.default_rng(seed + [int(index)])


_JOB = {}


def _init_job(style, seed, fonts, fmt):
    _JOB.update(style=style, seed=seed, fonts=list(fonts), words=load_words(), fmt=fmt)


def _render_sample(index):
    rng = sample_rng(_JOB["seed"], index)
    label = make_label(rng, _JOB["words"])
    img = render_word(label, _JOB["style"], rng, _JOB["fonts"])
    return encode_image(img, _JOB["fmt"], rng), label


def make_samples(n, style, seed, fonts=None, workers=1, fmt=None):
    """Yield `(image_bytes, label)` for samples 0..n-1, in order, rendered by `workers` processes.
    `fmt` ("JPEG" or "PNG") defaults to the style's own (PNG for the target styles)."""
    get_renderer(style)
    fonts = split_fonts()[0] if fonts is None else list(fonts)
    fmt = fmt or FORMATS.get(style, "PNG")
    if workers <= 1 or n < 64:  # a pool costs more than it saves on a handful of images
        _init_job(style, seed, fonts, fmt)
        for i in range(n):
            yield _render_sample(i)
        return
    with multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
            workers, initializer=_init_job, initargs=(style, seed, fonts, fmt)) as pool:
        yield from pool.imap(_render_sample, range(n), chunksize=64)


def make_lmdb_set(path, n, style, seed, fonts=None, workers=1, overwrite=False, fmt=None):
    """Render n samples of a style into a new LMDB at path; returns the number written."""
    samples = ((img, label, None) for img, label in make_samples(n, style, seed, fonts, workers, fmt))
    return lmdb_writing.write_lmdb(path, samples, overwrite=overwrite)


def plan_sets(opt, seen, unseen):
    """(relative path, count, style, fonts, seed, format) of every set to build."""
    if opt.target:
        # The target domain brings its own fonts too: every set draws from all of them, so the
        # pool teaches the typefaces the source sets hold out.
        fonts = list(seen) + list(unseen)
        # Seeds apart from the source sets' (seed, 0..4) and from every other target style's.
        tag = 100 + TARGET_STYLES.index(opt.target)
        return [
            (f"train_data_lmdb/{opt.target}", opt.num_pool, opt.target, fonts, [opt.seed, tag, 0], "JPEG"),
            (f"valid_data_lmdb/{opt.target}_valid", opt.num_valid, opt.target, fonts, [opt.seed, tag, 1], "PNG"),
            (f"test_data_lmdb/{opt.target}_test", opt.num_test, opt.target, fonts, [opt.seed, tag, 2], "PNG"),
        ]
    sets = [
        ("train_data_lmdb/CVPR2016", opt.num, "cvpr2016", seen),
        ("train_data_lmdb/NIPS2014", opt.num, "nips2014", seen),
        ("valid_data_lmdb/synth_valid", opt.num_valid, "mixed", seen),
        ("test_data_lmdb/synth_seen_fonts", opt.num_test, "mixed", seen),
        ("test_data_lmdb/synth_unseen_fonts", opt.num_test, "mixed", unseen),
    ]
    return [(rel, n, style, fonts, [opt.seed, k], FORMATS[style]) for k, (rel, n, style, fonts) in enumerate(sets)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="root folder of the generated LMDBs")
    parser.add_argument("--num", type=int, default=10000, help="images in each training set")
    parser.add_argument("--num_valid", type=int, default=1000, help="images in the validation set")
    parser.add_argument("--num_test", type=int, default=2000, help="images in each evaluation set")
    parser.add_argument("--target", choices=TARGET_STYLES, default=None,
                        help="build a target-domain root in this style instead of the source sets, in all "
                             "fonts: train_data_lmdb/STYLE (the pool, --num_pool labelled words), "
                             "valid_data_lmdb/STYLE_valid and test_data_lmdb/STYLE_test")
    parser.add_argument("--num_pool", type=int, default=25000, help="images in the target pool (with --target)")
    parser.add_argument("--seed", type=int, default=2016, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--workers", type=int, default=options.usable_cores(),
                        help="rendering processes (default: the cores this process may use)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild sets that already exist")
    opt = parser.parse_args(argv)
    for flag in ("num", "num_valid", "num_test", "num_pool"):
        if getattr(opt, flag) < 1:
            raise utils.UserError(f"--{flag} must be at least 1")
    options.check_output_dir(opt.out, "--out")
    return opt


@utils.exit_on_user_error
def main(argv=None):
    opt = parse_args(argv)
    seen, unseen = split_fonts()
    words = load_words()
    print(f"{len(words)} words; {len(seen)} training fonts, {len(unseen)} held-out fonts")
    started = time.time()
    info = {"seed": opt.seed, "words": "english-words (gcide)", "sets": {}}
    for rel, n, style, fonts, seed, fmt in plan_sets(opt, seen, unseen):
        path = os.path.join(opt.out, rel)
        if os.path.isfile(os.path.join(path, "data.mdb")) and not opt.overwrite:
            print(f"{path}: exists, kept (use --overwrite to rebuild)")
            continue
        t0 = time.time()
        count = make_lmdb_set(path, n, style, seed, fonts, opt.workers, overwrite=opt.overwrite, fmt=fmt)
        print(f"{path}: {count} {style} images in {time.time() - t0:.1f}s")
        info["sets"][rel] = {"num": count, "style": style, "seed": seed, "format": fmt,
                             "fonts": [os.path.basename(f) for f in fonts]}
        if style in TARGET_STYLES:
            info["sets"][rel]["strength"] = SIGNAGE
    if info["sets"]:
        atomic_io.atomic_write_text(os.path.join(opt.out, "synth_info.json"), json.dumps(info, indent=1) + "\n")
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
