"""Render the embedded synthetic word-image LMDBs (`make data`).

Writes, deterministically from --seed, under --out (default `data`):
  train_data_lmdb/CVPR2016    SynthText-like: colour, textured or photo-like backgrounds, rotation (JPEG)
  train_data_lmdb/NIPS2014    MJSynth-like: clean backgrounds, many fonts, blur and noise (JPEG)
  valid_data_lmdb/synth_valid both styles, training fonts, for validation during training (PNG)
  test_data_lmdb/synth_seen_fonts    both styles, training fonts (PNG)
  test_data_lmdb/synth_unseen_fonts  both styles, fonts the training sets never use (PNG)

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

import atomic_io  # noqa: E402  (the repo root is on sys.path only from here)
import dataset  # noqa: E402
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


RENDERERS = {"cvpr2016": render_cvpr2016, "nips2014": render_nips2014, "mixed": render_mixed}
# Image encoding per set: JPEG like the real training sets (and 4x smaller than PNG on these noisy
# crops); the evaluation sets in PNG so that both decoders are exercised.
FORMATS = {"cvpr2016": "JPEG", "nips2014": "JPEG", "mixed": "PNG"}


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


def _init_job(style, seed, fonts):
    _JOB.update(style=style, seed=seed, fonts=list(fonts), words=load_words())


def _render_sample(index):
    rng = sample_rng(_JOB["seed"], index)
    label = make_label(rng, _JOB["words"])
    img = render_word(label, _JOB["style"], rng, _JOB["fonts"])
    return encode_image(img, FORMATS[_JOB["style"]], rng), label


def make_samples(n, style, seed, fonts=None, workers=1):
    """Yield `(image_bytes, label)` for samples 0..n-1, in order, rendered by `workers` processes."""
    get_renderer(style)
    fonts = split_fonts()[0] if fonts is None else list(fonts)
    if workers <= 1 or n < 64:  # a pool costs more than it saves on a handful of images
        _init_job(style, seed, fonts)
        for i in range(n):
            yield _render_sample(i)
        return
    with multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
            workers, initializer=_init_job, initargs=(style, seed, fonts)) as pool:
        yield from pool.imap(_render_sample, range(n), chunksize=64)


def make_lmdb_set(path, n, style, seed, fonts=None, workers=1, overwrite=False):
    """Render n samples of a style into a new LMDB at path; returns the number written."""
    samples = ((img, label, None) for img, label in make_samples(n, style, seed, fonts, workers))
    return dataset.write_lmdb(path, samples, overwrite=overwrite)


def plan_sets(opt, seen, unseen):
    """(relative path, count, style, fonts) of every set to build."""
    return [
        ("train_data_lmdb/CVPR2016", opt.num, "cvpr2016", seen),
        ("train_data_lmdb/NIPS2014", opt.num, "nips2014", seen),
        ("valid_data_lmdb/synth_valid", opt.num_valid, "mixed", seen),
        ("test_data_lmdb/synth_seen_fonts", opt.num_test, "mixed", seen),
        ("test_data_lmdb/synth_unseen_fonts", opt.num_test, "mixed", unseen),
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="root folder of the generated LMDBs")
    parser.add_argument("--num", type=int, default=10000, help="images in each training set")
    parser.add_argument("--num_valid", type=int, default=1000, help="images in the validation set")
    parser.add_argument("--num_test", type=int, default=2000, help="images in each evaluation set")
    parser.add_argument("--seed", type=int, default=2016, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--workers", type=int, default=options.usable_cores(),
                        help="rendering processes (default: the cores this process may use)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild sets that already exist")
    opt = parser.parse_args(argv)
    for flag in ("num", "num_valid", "num_test"):
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
    for k, (rel, n, style, fonts) in enumerate(plan_sets(opt, seen, unseen)):
        path = os.path.join(opt.out, rel)
        if os.path.isfile(os.path.join(path, "data.mdb")) and not opt.overwrite:
            print(f"{path}: exists, kept (use --overwrite to rebuild)")
            continue
        t0 = time.time()
        count = make_lmdb_set(path, n, style, (opt.seed, k), fonts, opt.workers, overwrite=opt.overwrite)
        print(f"{path}: {count} {style} images in {time.time() - t0:.1f}s")
        info["sets"][rel] = {"num": count, "style": style, "seed": [opt.seed, k],
                             "fonts": [os.path.basename(f) for f in fonts]}
    if info["sets"]:
        atomic_io.atomic_write_text(os.path.join(opt.out, "synth_info.json"), json.dumps(info, indent=1) + "\n")
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
