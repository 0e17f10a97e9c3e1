"""Build an LMDB dataset (deep-text-recognition-benchmark format) from images and a gt file.

    python create_lmdb_dataset.py --inputPath data/ --gtFile data/gt.txt --outputPath result/
    python create_lmdb_dataset.py --unlabelled --inputPath crops/ --outputPath pool/

Each gt line is `relative/image/path<TAB>label` (split on the first tab, so a label may hold spaces
or tabs). Lines that cannot be used are skipped and reported with their reason; the LMDB is built
in a hidden sibling folder and renamed into place when complete. With --unlabelled every image
file below --inputPath (recursively, in sorted path order) becomes a sample with an empty label and
its path kept: a pool for data_sampling.py, never training data."""
import argparse
import collections
import io
import os
import sys

from PIL import Image

import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
import options
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
    parser.add_argument("--gtFile", default="", help="UTF-8 text file: one `path<TAB>label` per line "
                                                      "(required unless --unlabelled)")
    parser.add_argument("--outputPath", required=True, help="folder of the new LMDB")
    parser.add_argument("--checkValid", nargs="?", const=True, default=True, type=parse_bool,
                        help="decode every image with Pillow and skip those that fail (default: on; "
                             "--checkValid False or --nocheckValid turns it off)")
    parser.add_argument("--nocheckValid", dest="checkValid", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing LMDB at --outputPath")
    parser.add_argument("--unlabelled", action="store_true",
                        help="no --gtFile: every readable image below --inputPath (recursively, sorted by path; "
                             "every file is decoded, the others are reported and skipped), with an empty label and "
                             "its relative path (key path-%%09d); marked unlabelled, so that data_sampling.py uses it "
                             "whole as a pool and train.py / test.py refuse it")
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
    """Collects skipped lines (or files); prints the first few and a count per reason."""

    def __init__(self, unit="line"):
        self.unit = unit
        self.by_reason = collections.Counter()

    def skip(self, line_no, reason, detail):
        self.by_reason[reason.split(" (")[0]] += 1
        if sum(self.by_reason.values()) <= MAX_REPORTED:
            print(f"skipped {self.unit} {line_no}: {reason}: {detail}", file=sys.stderr)

    @property
    def total(self):
        return sum(self.by_reason.values())

    def summary(self):
        if not self.total:
            return "no line skipped"
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.by_reason.items()))
        return f"skipped {self.total} {self.unit}(s): {reasons}"


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
        if not os.path.exists(path):
            report.skip(line_no, "missing file", path)
            continue
        buf, reason = dataset.read_image_file(path)
        if reason:
            report.skip(line_no, reason, path)
            continue
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
    written = lmdb_writing.write_lmdb(output_path, iter_samples(input_path, lines, check_valid, report),
                                      overwrite=overwrite)
    return written, report


def list_image_files(input_path, output_path):
    """Relative POSIX paths of every file below input_path, sorted by path (code point order, the
    same on every machine), leaving out the output LMDB and hidden files and folders (a write in
    progress, `.DS_Store`)."""
    skip = os.path.realpath(output_path)
    found = []
    for dirpath, dirnames, filenames in os.walk(input_path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and os.path.realpath(os.path.join(dirpath, d)) != skip]
        for name in filenames:
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, name), input_path).replace(os.sep, "/"))
    return sorted(found)


def iter_unlabelled(input_path, relpaths, report):
    """`(image_bytes, "", None, {b"path": relpath})` for every file that decodes as an image."""
    count = 0
    for relpath in relpaths:
        path = os.path.join(input_path, relpath)
        buf, reason = dataset.read_image_file(path)
        if reason:
            report.skip(relpath, reason, path)
            continue
        reason = check_image(buf)
        if reason:
            report.skip(relpath, reason, path)
            continue
        count += 1
        yield buf, "", None, {b"path": relpath.encode("utf-8")}
    if not count:
        raise utils.UserError(f"--inputPath {input_path}: no readable image below it ({report.summary()})")


def create_unlabelled_dataset(input_path, output_path, overwrite=False):
    """Write the unlabelled LMDB; returns `(written, report)`."""
    if not os.path.isdir(input_path):
        raise utils.UserError(f"--inputPath {input_path}: no such folder")
    relpaths = list_image_files(input_path, output_path)  # listed before the LMDB's temporary folder exists
    report = Report(unit="file")
    written = lmdb_writing.write_lmdb(output_path, iter_unlabelled(input_path, relpaths, report), overwrite=overwrite,
                                      extra_keys={lmdb_format.UNLABELLED_KEY: b"1"})
    return written, report


@utils.exit_on_user_error
def main(argv=None):
    opt = parse_args(argv)
    options.check_output_dir(opt.outputPath, "--outputPath")
    if opt.unlabelled:
        if opt.gtFile:
            raise utils.UserError(f"--gtFile {opt.gtFile} with --unlabelled: an unlabelled LMDB reads no labels; "
                                  f"drop one of the two")
        written, report = create_unlabelled_dataset(opt.inputPath, opt.outputPath, opt.overwrite)
        print(f"Created unlabelled dataset with {written} images at {opt.outputPath}; {report.summary()}")
        return
    if not opt.gtFile:
        raise utils.UserError("--gtFile is missing; give the `path<TAB>label` file, or pass --unlabelled for "
                              "images without labels")
    written, report = create_dataset(opt.inputPath, opt.gtFile, opt.outputPath, opt.checkValid, opt.overwrite)
    print(f"Created dataset with {written} samples at {opt.outputPath}; {report.summary()}")


if __name__ == "__main__":
    main()
