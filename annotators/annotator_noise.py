"""Simulated annotators: which labels a noisy annotator gets wrong, and how.

Which labels. Exactly `round(noise_ratio x n)` labels of a dataset of n samples are corrupted
(halves round up), so `--noise_ratio 0.2` means a fifth of the labels, not a fifth on average.
Every sample draws one number from a generator fixed by the seed and its identity alone (blake2b,
never the salted built-in `hash`), and the samples with the smallest draws are corrupted. So the
choice is the same in every run, process and order, and the labels corrupted at one ratio are also
corrupted at any larger ratio (nested, as a noise sweep needs). A sample whose label cannot be made
different (an empty label, a charset with no other character) is passed over and the next in that
order is taken, so the count stays exact whenever enough labels can be changed.

How (`--noise_model`, the registry `NOISE_MODELS`). The corruption uses the later draws of the same
per-sample generator, so a sample gets the same wrong label at every ratio. Every model keeps the
wrong label inside the charset and, when a maximum length is given, within it, and different from
the clean one; it reports the kind of error it made:
- `substitute` (the default, the original's annotator): one character, at a drawn position,
  replaced by another character of the charset. Kind `substitution`.
- `confusable`: one substitution between glyphs that people and OCR engines confuse, from
  `CONFUSABLE_GLYPHS` / `CONFUSABLE_SEQUENCES` below (0/O/o, 1/l/I/i, 5/S, 8/B, 2/Z, c/e, u/v,
  rn/m, cl/d, vv/w, case flips of c/o/s/v/w/x/z, ...): a site is drawn among the label's
  confusable ones, then one of its look-alikes. Only look-alikes inside the charset count (with the
  36-character lowercase charset most pairs collapse and case flips are impossible); a label with
  no confusable site gets a plain substitution. Kind `confusion`, or `substitution` for that
  fallback.
- `edit`: one insertion (a charset character at a position 0..len), deletion (labels of two
  characters or more, so a label never becomes empty) or substitution, the kind drawn evenly and
  then the position. A kind the label does not allow (an insertion at the maximum length, a
  deletion from one character) is replaced by a draw among those it allows. Kind `insertion`,
  `deletion` or `substitution`.
- `mixed`: a mixture drawn per sample: 40% `confusable`, 40% `edit`, 10% `substitute` and 10% a
  whole-word slip, half of them a truncation (the word cut after its first k characters, k drawn in
  1..len-1) and half a neighbouring word (the clean label of the sample just before or just after
  it in the order the samples are given, the dataset's order; the side drawn). A slip the label
  does not allow (one character, no usable neighbour) becomes an `edit`. Kinds as the model
  applied, plus `truncation` and `neighbour`.

Stdlib only, so tools and tests import it without torch."""
import hashlib
import math
import random
from fractions import Fraction
from typing import NamedTuple

DEFAULT_MODEL = "substitute"

# Look-alike glyphs, written for this project from the character confusions that OCR error
# models and post-OCR correction work deal with (see e.g. the survey of Nguyen, Jatowt, Coustaty
# and Doucet, "Survey of Post-OCR Processing Approaches", ACM Computing Surveys 54(6), 2021) and
# from the usual handwriting slips; not copied from any published list. Each group is symmetric:
# any member may be read as any other member of a group it belongs to.
CONFUSABLE_GLYPHS = ("0Oo", "ODQ", "1lIi|!", "5Ss", "8B", "2Zz", "6bG", "9gq", "4A", "7T", "ce", "uv", "ao",
                     "nh", "ft", "EF", "PR")
# Case flips of letters whose capital is the small letter drawn larger.
CASE_FLIPS = "cosvwxzkpu"
# Sequences read as one glyph and back (so these change the length, as real misreadings do).
CONFUSABLE_SEQUENCES = (("rn", "m"), ("cl", "d"), ("vv", "w"), ("ri", "n"), ("ii", "u"))
# The mixture of `mixed`: (share, what); the shares add up to 1.
MIXTURE = ((0.4, "confusable"), (0.4, "edit"), (0.1, "substitute"), (0.05, "truncation"), (0.05, "neighbour"))


class Corruption(NamedTuple):
    """A wrong label and the kind of error that made it."""
    label: str
    kind: str


class SampleContext(NamedTuple):
    """What a noise model may know beside the label: the maximum label length (None: no bound)
    and the clean labels of the samples next to it in the dataset's order (before, after)."""
    max_length: object = None
    neighbours: tuple = ()


def _glyph_table():
    """{glyph or sequence: look-alikes in a fixed order} from the tables above."""
    table = {}

    def add(source, target):
        targets = table.setdefault(source, [])
        if target != source and target not in targets:
            targets.append(target)

    for group in CONFUSABLE_GLYPHS:
        for source in group:
            for target in group:
                add(source, target)
    for letter in CASE_FLIPS:
        add(letter, letter.upper())
        add(letter.upper(), letter)
    for a, b in CONFUSABLE_SEQUENCES:
        add(a, b)
        add(b, a)
    return table


CONFUSIONS = _glyph_table()


def identity_text(identity):
    if isinstance(identity, (tuple, list)):
        return "\t".join(str(part) for part in identity)
    return str(identity)


def sample_rng(seed, identity):
    """A `random.Random` fixed by `seed` and the sample identity alone."""
    digest = hashlib.blake2b(f"{seed}\n{identity_text(identity)}".encode("utf-8"), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


def exact_ratio(ratio):
    """`ratio` as the exact fraction it was written as: a float by its shortest decimal form (what
    the user typed: 0.29 is 29/100, not the binary double just below it), anything else
    (an int, a Fraction, a Decimal, a decimal string) as it is."""
    if isinstance(ratio, float):
        return Fraction(repr(float(ratio)))
    return Fraction(ratio)


def corrupted_count(noise_ratio, n):
    """round(noise_ratio x n) with halves rounded up (Python's round() would round 0.5 to even), at
    most n. Exact arithmetic: in doubles 0.29 x 50 is 14.499999999999998, which would round to 14."""
    return min(n, math.floor(exact_ratio(noise_ratio) * n + Fraction(1, 2)))


def _alphabet(charset):
    return list(dict.fromkeys(charset))


def _fits(text, context):
    return context.max_length is None or len(text) <= context.max_length


def substitute(label, rng, charset):
    """One character, at a position drawn by rng, replaced by a different character of charset;
    the label unchanged when it is empty or the charset offers no other character."""
    if not label:
        return label
    position = rng.randrange(len(label))
    choices = [char for char in dict.fromkeys(charset) if char != label[position]]
    if not choices:
        return label
    return label[:position] + rng.choice(choices) + label[position + 1:]


def _substitution(label, rng, charset):
    """One substitution at a position drawn among those the charset can change (a label's
    characters are normally all changeable, but a one-character charset changes none)."""
    alphabet = _alphabet(charset)
    positions = [p for p, char in enumerate(label) if any(c != char for c in alphabet)]
    if not positions:
        return label, None
    position = rng.choice(positions)
    choices = [c for c in alphabet if c != label[position]]
    return label[:position] + rng.choice(choices) + label[position + 1:], "substitution"


# ---------------------------------------------------------------------------------------------
# the models: (label, rng, charset, context) -> (noisy label, kind); (label, None) when the label
# cannot be changed


def substitute_model(label, rng, charset, context):
    """Today's annotator, draw for draw: `substitute`."""
    noisy = substitute(label, rng, charset)
    return noisy, ("substitution" if noisy != label else None)


def confusion_sites(label, charset, context):
    """[(position, source, look-alikes)] for every confusable glyph or sequence of `label` that
    has a look-alike made of charset characters within the length bound."""
    allowed = set(charset)
    sites = []
    for position in range(len(label)):
        for size in (1, 2):
            source = label[position:position + size]
            if len(source) != size or source not in CONFUSIONS:
                continue
            targets = [t for t in CONFUSIONS[source] if all(c in allowed for c in t)
                       and (context.max_length is None or len(label) - size + len(t) <= context.max_length)]
            if targets:
                sites.append((position, source, targets))
    return sites


def confusable_model(label, rng, charset, context):
    sites = confusion_sites(label, charset, context)
    if not sites:
        return _substitution(label, rng, charset)
    position, source, targets = rng.choice(sites)
    return label[:position] + rng.choice(targets) + label[position + len(source):], "confusion"


EDIT_KINDS = ("insertion", "deletion", "substitution")


def edit_model(label, rng, charset, context):
    alphabet = _alphabet(charset)
    allowed = {"insertion": bool(alphabet) and _fits(label + "x", context),
               "deletion": len(label) >= 2,
               "substitution": any(c != char for char in label for c in alphabet)}
    kind = rng.choice(EDIT_KINDS)
    if not allowed[kind]:
        possible = [k for k in EDIT_KINDS if allowed[k]]
        if not possible:
            return label, None
        kind = rng.choice(possible)
    if kind == "insertion":
        position = rng.randrange(len(label) + 1)
        return label[:position] + rng.choice(alphabet) + label[position:], kind
    if kind == "deletion":
        position = rng.randrange(len(label))
        return label[:position] + label[position + 1:], kind
    return _substitution(label, rng, charset)


def truncation(label, rng, charset, context):
    if len(label) < 2:
        return label, None
    return label[:rng.randint(1, len(label) - 1)], "truncation"


def neighbour(label, rng, charset, context):
    allowed = set(charset)
    usable = sorted({word for word in context.neighbours if word and word != label
                     and all(c in allowed for c in word) and _fits(word, context)})
    if not usable:
        return label, None
    return rng.choice(usable), "neighbour"


def mixed_model(label, rng, charset, context):
    u, total = rng.random(), 0.0
    what = MIXTURE[-1][1]
    for share, name in MIXTURE:
        total += share
        if u < total:
            what = name
            break
    noisy, kind = MIXED_PARTS[what](label, rng, charset, context)
    if kind is None and what in ("truncation", "neighbour"):
        noisy, kind = edit_model(label, rng, charset, context)
    return noisy, kind


MIXED_PARTS = {"confusable": confusable_model, "edit": edit_model, "substitute": substitute_model,
               "truncation": truncation, "neighbour": neighbour}
NOISE_MODELS = {"substitute": substitute_model, "confusable": confusable_model, "edit": edit_model,
                "mixed": mixed_model}


def get_model(name):
    """The noise model called `name`; a UserError listing the known ones otherwise."""
    if name not in NOISE_MODELS:
        from utils import UserError  # here, so that the module itself needs no torch

        raise UserError(f"--noise_model {name}: unknown; choose one of {', '.join(NOISE_MODELS)}")
    return NOISE_MODELS[name]


def noisy_labels(samples, noise_ratio, charset, seed, max_length=None, model=DEFAULT_MODEL):
    """{identity: Corruption(wrong label, kind)} for exactly `corrupted_count(noise_ratio, n)` of
    the n `(identity, label)` samples (fewer only when too few labels can be changed), corrupted
    by the noise model `model`. A wrong label stays within charset and, when given, `max_length`
    characters. The samples' order matters only to `mixed`'s neighbouring words."""
    corrupt = get_model(model)
    samples = list(samples)
    target = corrupted_count(noise_ratio, len(samples))
    if target == 0:
        return {}
    drawn = []
    for position, (identity, label) in enumerate(samples):
        rng = sample_rng(seed, identity)
        drawn.append((rng.random(), identity_text(identity), position, identity, label, rng))
    drawn.sort(key=lambda item: item[:2])
    wrong = {}
    for _, _, position, identity, label, rng in drawn:
        if not label:  # nothing to misread (a dataset filters empty labels out anyway)
            continue
        neighbours = tuple(samples[p][1] for p in (position - 1, position + 1) if 0 <= p < len(samples))
        noisy, kind = corrupt(label, rng, charset, SampleContext(max_length, neighbours))
        if max_length is not None:
            noisy = noisy[:max_length]
        if noisy != label and kind is not None:
            wrong[identity] = Corruption(noisy, kind)
            if len(wrong) == target:
                break
    return wrong
