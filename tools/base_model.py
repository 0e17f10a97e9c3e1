"""What scripts/al_loop.sh needs to start round 0 from a checkpoint (--base_model): the checks,
the checkpoint's architecture flags and hash, and the character-set coverage report.

    python tools/base_model.py --base_model CKPT [--model_preset NAME|FILE] --arch "FLAGS" \\
        --train_args "FLAGS" --base_iters N --print0
    python tools/base_model.py ... --coverage --train_data DIR --select_data A-B --valid_data DIR \\
        --test_data DIR

--print0 writes NUL-separated fields for a shell to read: the checkpoint's SHA-256, `--FT` or an
empty field (round 0 has another character set than the checkpoint), the architecture's source
(the opt.yaml or preset file, empty when the flags must describe it), then its architecture flags.
--coverage prints the report of pretrained.start_report. Bad input: one `error:` line, exit 2."""
import argparse
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pretrained  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--base_model", required=True, help="the checkpoint round 0 starts from")
    parser.add_argument("--model_preset", default="", help="its architecture when no opt.yaml lies beside it")
    parser.add_argument("--arch", default="", help="the loop's --arch flags (after the checkpoint's)")
    parser.add_argument("--train_args", default="", help="the loop's --train_args flags")
    parser.add_argument("--base_iters", type=int, required=True, help="iterations of round 0 (0: as it is)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--print0", action="store_true", help="the fields for the shell (above)")
    mode.add_argument("--coverage", action="store_true", help="the round-0 report")
    for name in ("train_data", "select_data", "valid_data", "test_data"):
        parser.add_argument(f"--{name}", default="", help="with --coverage")
    return parser


def split(flag, text):
    try:
        return shlex.split(text)
    except ValueError as err:
        raise UserError(f"{flag} {text!r}: {err}") from None


def main(opt):
    if opt.base_iters < 0:
        raise UserError(f"--base_iters {opt.base_iters}: give 0 (the checkpoint as it is) or more")
    values, source = pretrained.checkpoint_architecture(opt.base_model, opt.model_preset)
    flags = split("--arch", opt.arch) + split("--train_args", opt.train_args)
    own, run = pretrained.check_start(opt.base_model, values, flags, opt.base_iters,
                                      f"--arch {opt.arch.strip()!r} / --train_args {opt.train_args.strip()!r}")
    sha256 = pretrained.file_sha256(opt.base_model)
    if opt.print0:
        fields = [sha256, "--FT" if own != run else "", source, *pretrained.architecture_flags(values)]
        sys.stdout.write("".join(field + "\0" for field in fields))
        return
    coverages = []
    if run is not None:
        coverages = pretrained.data_coverage(run, opt.train_data, opt.select_data.split("-"), opt.valid_data,
                                             opt.test_data or opt.valid_data)
    print("\n".join(pretrained.start_report(os.path.abspath(opt.base_model), sha256, opt.base_iters, source, own,
                                            run, coverages)))


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
