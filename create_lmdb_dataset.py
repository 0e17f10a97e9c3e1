"""Build an LMDB dataset (deep-text-recognition-benchmark format) from images and a gt file.

    python create_lmdb_dataset.py --inputPath data/ --gtFile data/gt.txt --outputPath result/

Each gt line is `relative/image/path<TAB>label` (split on the first tab, so a label may hold spaces
or tabs). Lines that cannot be used are skipped and reported with their reason; the LMDB is built
in a hidden sibling folder and renamed into place when complete."""
import argparse
import collections
import io
import os
import sys

from PIL import Image

import dataset
import utils

MAX_REPORTED = 50


def parse_bool(value):
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputPath", required=True, help="folder the image paths in --gtFile are relative to")
    parser.add_argument("--gtFile", required=True, help="UTF-8 text file: one `path<TAB>label` per line")
    parser.add_argument("--outputPath", required=True, help="folder of the new LMDB")
    parser.add_argument("--checkValid", nargs="?", const=True, default=True, type=parse_bool,
                        help="decode every image with Pillow and skip those that fail (default: on; "
                             "--checkValid False or --nocheckValid turns it off)")
    parser.add_argument("--nocheckValid", dest="checkValid", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing LMDB at --outputPath")
    return parser.parse_args(argv)


def check_image(buf):
    """None when Pillow decodes the bytes into a non-empty image the datasets can read, else the
    reason."""
    try:
        with Image.open(io.BytesIO(buf)) as img:
            img.load()
            if img.width * img.height == 0:
                return "empty image"
            try:
                dataset.eight_bit(img)
            except ValueError:
                return f"unsupported pixel format (mode {img.mode})"
    except Exception as err:  # Pillow raises many types for bad bytes
        return f"undecodable image ({type(err).__name__})"
    return None


def read_gt_lines(gt_file):
    try:
        with open(gt_file, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise utils.UserError(f"--gtFile {gt_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_gt_line(line):
    """`(relpath, label, None)` or `(None, None, reason)`."""
    if "\t" not in line:
        return None, None, "malformed line (no tab between path and label)"
    relpath, label = line.split("\t", 1)
    if not relpath.strip():
        return None, None, "malformed line (empty image path)"
    if not label:
        return None, None, "empty label"
    return relpath, label, None


class Report:
    """Collects skipped lines; prints the first few and a count per reason."""

    def __init__(self):
        self.by_reason = collections.Counter()

    def skip(self, line_no, reason, detail):
        self.by_reason[reason.split(" (")[0]] += 1
        if sum(self.by_reason.values()) <= MAX_REPORTED:
            print(f"skipped line {line_no}: {reason}: {detail}", file=sys.stderr)

    @property
    def total(self):
        return sum(self.by_reason.values())

    def summary(self):
        if not self.total:
            return "no line skipped"
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.by_reason.items()))
        return f"skipped {self.total} line(s): {reasons}"


def iter_samples(input_path, lines, check_valid, report):
    """`(image_bytes, label, None)` for every usable gt line, in file order."""
    count = 0
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not samples
        relpath, label, reason = parse_gt_line(line)
        if reason:
            report.skip(line_no, reason, line[:80])
            continue
        path = os.path.join(input_path, relpath)
        if not os.path.isfile(path):
            report.skip(line_no, "missing file", path)
            continue
        with open(path, "rb") as f:
            buf = f.read()
        if check_valid:
            reason = check_image(buf)
            if reason:
                report.skip(line_no, reason, path)
                continue
        count += 1
        yield buf, label, None
        if line_no % 1000 == 0:
            print(f"read {line_no} / {len(lines)} lines")
    if not count:
        # Raised inside the writer's loop, so the half-built LMDB is removed.
        raise utils.UserError(f"no usable line in --gtFile ({report.summary()}); lines are `path<TAB>label`")


def create_dataset(input_path, gt_file, output_path, check_valid=True, overwrite=False):
    """Write the LMDB; returns `(written, report)`."""
    if not os.path.isdir(input_path):
        raise utils.UserError(f"--inputPath {input_path}: no such folder")
    if not os.path.isfile(gt_file):
        raise utils.UserError(f"--gtFile {gt_file}: no such file")
    lines = read_gt_lines(gt_file)
    report = Report()
    written = dataset.write_lmdb(output_path, iter_samples(input_path, lines, check_valid, report),
                                 overwrite=overwrite)
    return written, report


@utils.exit_on_user_error
def main(argv=None):
    opt = parse_args(argv)
    written, report = create_dataset(opt.inputPath, opt.gtFile, opt.outputPath, opt.checkValid, opt.overwrite)
    print(f"Created dataset with {written} samples at {opt.outputPath}; {report.summary()}")


if __name__ == "__main__":
    main()
