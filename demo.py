"""Read the text in every image of a folder with a saved recognizer.

    python demo.py --image_folder demo_image/ --saved_model saved_models/<exp>/best_accuracy.pth

Prints one row per image (file, prediction, confidence) as an aligned table; `--csv PATH` also
writes it as CSV. The architecture comes from the flags, or, for flags not given, from the
opt.yaml beside the model. Files that do not decode as images are listed as skipped."""
import argparse
import csv
import math
import os
import sys

import torch
import torch.utils.data

import options
import utils
from dataset import AlignCollate, RawDataset
from evaluation import forward_logits
from model import Model, load_weights


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Predict the text of every image in --image_folder with a saved model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("demo")
    group.add_argument("--image_folder", help="folder of images (searched recursively; required)")
    group.add_argument("--saved_model", help="model to run (required); architecture flags not given are read "
                                             "from the opt.yaml beside it")
    group.add_argument("--temperature", default="none",
                       help="a number > 0 to report temperature-calibrated confidences (e.g. the one test.py "
                            "--temperature auto fitted), or none")
    group.add_argument("--csv", default="", help="also write the table to this CSV file "
                                                 "(columns file, prediction, confidence, status)")
    options.add_data_args(parser)
    options.add_model_args(parser, required=False)
    options.add_runtime_args(parser)
    return parser


def parse_args(argv=None):
    """Parse `argv`, remembering which options were given so opt.yaml fills only the others."""
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given_options = sorted(options.given_options(parser, argv))
    return args


def given_option_names(opt):
    # Callers that build the Namespace themselves: what differs from the defaults counts as given.
    if getattr(opt, "given_options", None) is not None:
        return set(opt.given_options)
    defaults = vars(get_args_parser().parse_args([]))
    return {name for name, value in vars(opt).items() if defaults.get(name, value) != value}


def parse_temperature(value):
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    try:
        temperature = float(text)
    except ValueError:
        raise utils.UserError(f"--temperature {value!r}: give a positive number such as 1.5, or none "
                              "(fit one with test.py --temperature auto)") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise utils.UserError(f"--temperature {value}: the temperature must be a positive number")
    return temperature


def check_inputs(opt):
    if not opt.image_folder:
        raise utils.UserError("--image_folder is required: give the folder of images to read")
    if not os.path.isdir(opt.image_folder):
        raise utils.UserError(f"--image_folder {opt.image_folder}: no such folder")
    if not opt.saved_model:
        raise utils.UserError("--saved_model is required: give the checkpoint to run")
    if not os.path.isfile(opt.saved_model):
        raise utils.UserError(f"--saved_model {opt.saved_model}: no such file")


def load_model(opt, device):
    model = Model(opt)
    load_weights(model, opt.saved_model, strict=True)
    model.to(device)
    model.eval()
    return model


def predict(model, loader, converter, opt, device, temperature):
    """`[(path, prediction, confidence)]` for every image that decoded."""
    rows = []
    with torch.no_grad():
        for images, paths, _ in loader:
            if not paths:
                continue
            with utils.autocast_context(device, opt.amp):
                logits = forward_logits(model, images.to(device), opt.batch_max_length, opt.Prediction)
            logits = logits.float()
            if temperature is not None:
                logits = utils.apply_temperature(logits, temperature)
            texts, confidence, _ = utils.decode_predictions(logits, converter)
            rows.extend(zip(paths, texts, confidence.tolist()))
    return rows


def format_table(header, rows):
    """Aligned text: text columns left-aligned, the last (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(row):
        cells = [cell.rjust(w) if i == len(row) - 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])


def write_csv(path, rows, skipped):
    with utils.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "prediction", "confidence", "status"])
            for name, text, conf in rows:
                writer.writerow([name, text, f"{conf:.6f}", "ok"])
            for name, reason in skipped:
                writer.writerow([name, "", "", f"skipped: {reason}"])


def main(opt):
    check_inputs(opt)
    options.fill_from_saved(opt, given_option_names(opt))
    options.resolve_options(opt)
    temperature = parse_temperature(opt.temperature)
    device = utils.select_device(opt.device)
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    model = load_model(opt, device)

    images = RawDataset(opt.image_folder, opt)
    collate = AlignCollate(imgH=opt.imgH, imgW=opt.imgW, keep_ratio_with_pad=opt.PAD, channels=3 if opt.rgb else 1)
    loader = torch.utils.data.DataLoader(images, batch_size=opt.batch_size, shuffle=False, num_workers=opt.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    predictions = predict(model, loader, converter, opt, device, temperature)

    def rel(path):
        return os.path.relpath(path, opt.image_folder)

    # Files can pass RawDataset's header check and still fail to decode in full; those are
    # dropped by the collate and show up here as missing.
    done = {path for path, _, _ in predictions}
    skipped = [(rel(path), reason) for path, reason in images.skipped]
    skipped += [(rel(path), "undecodable image") for path in images.paths if path not in done]
    rows = [(rel(path), text, conf) for path, text, conf in predictions]

    if temperature is not None:
        print(f"confidence calibrated with temperature {temperature:g}")
    print(format_table(["file", "prediction", "confidence"], [[n, t, f"{c:.4f}"] for n, t, c in rows]))
    if skipped:
        print(f"skipped {len(skipped)} undecodable file(s): " + ", ".join(name for name, _ in skipped))
    if opt.csv:
        write_csv(opt.csv, rows, skipped)
        print(f"table written to {opt.csv}")
    return rows, skipped


if __name__ == "__main__":
    utils.exit_on_user_error(main)(parse_args())
