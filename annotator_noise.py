"""Simulated annotators: which labels a noisy annotator gets wrong, and how.

Exactly `round(noise_ratio x n)` labels of a dataset of n samples are corrupted (halves round up),
so `--noise_ratio 0.2` means a fifth of the labels, not a fifth on average. Which ones: every
sample draws one number from a generator fixed by the seed and its identity alone (blake2b, never
the salted built-in `hash`), and the samples with the smallest draws are corrupted. So the choice
is the same in every run, process and order, and the labels corrupted at one ratio are also
corrupted at any larger ratio (nested, as a noise sweep needs). A sample whose label cannot be made
different (an empty label, a charset with no other character) is passed over and the next in that
order is taken, so the count stays exact whenever enough labels can be changed."""
import hashlib
import math
import random


def identity_text(identity):
    if isinstance(identity, (tuple, list)):
        return "\t".join(str(part) for part in identity)
    return str(identity)


def sample_rng(seed, identity):
    """A `random.Random` fixed by `seed` and the sample identity alone."""
    digest = hashlib.blake2b(f"{seed}\n{identity_text(identity)}".encode("utf-8"), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


def corrupted_count(noise_ratio, n):
    """round(noise_ratio x n) with halves rounded up (Python's round() would round 0.5 to even)."""
    return min(n, int(math.floor(noise_ratio * n + 0.5)))


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


def noisy_labels(samples, noise_ratio, charset, seed, max_length=None):
    """{identity: wrong label} for exactly `corrupted_count(noise_ratio, n)` of the n
    `(identity, label)` samples (fewer only when too few labels can be changed). A wrong label
    stays within charset and, when given, `max_length` characters."""
    samples = list(samples)
    target = corrupted_count(noise_ratio, len(samples))
    if target == 0:
        return {}
    drawn = []
    for identity, label in samples:
        rng = sample_rng(seed, identity)
        drawn.append((rng.random(), identity_text(identity), identity, label, rng))
    drawn.sort(key=lambda item: item[:2])
    wrong = {}
    for _, _, identity, label, rng in drawn:
        noisy = substitute(label, rng, charset)
        if max_length is not None:
            noisy = noisy[:max_length]
        if noisy != label:
            wrong[identity] = noisy
            if len(wrong) == target:
                break
    return wrong
