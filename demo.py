"""Read the text in every image of a folder with a saved recognizer.

    python demo.py --image_folder demo_image/ --saved_model saved_models/<exp>/best_accuracy.pth

Prints one row per image (file, prediction, confidence) as an aligned table; `--csv PATH` also
writes it as CSV. The architecture comes from the flags, or, for flags not given, from the
opt.yaml beside the model. Files that do not decode as images are listed as skipped. The confidence
may be temperature-scaled: by a number (a token-level temperature, as test.py fits it), or
`--temperature auto` fitted on the labelled `--valid_data` at the token or the word level
(`--calibration`; see measurement/calibration.py)."""
import csv
import os

import torch

from safe_files import atomic_io
from measurement import calibration
import options
import utils
from dataset import RawDataset
from measurement.evaluation import eval_loader, fit_temperature_on_valid_data, forward_logits, load_model

# Fitting needs labelled images: those of --valid_data, or the number test.py fits.
DEMO_TEMPERATURE_NOTE = ("auto needs labelled images in --valid_data (or take the token-level number test.py "
                         "--temperature auto fits)")


def get_args_parser():
    parser = options.make_parser("Predict the text of every image in --image_folder with a saved model.")
    group = parser.add_argument_group("demo")
    group.add_argument("--image_folder", help="folder of images (searched recursively; required)")
    options.add_temperature_arg(group, note=DEMO_TEMPERATURE_NOTE)
    group.add_argument("--csv", default="", help="also write the table to this CSV file "
                                                 "(columns file, prediction, confidence, status)")
    options.add_common_args(parser, saved_model_help="model to run (required)")
    return parser


def check_inputs(opt):
    options.require_dir(opt.image_folder, "--image_folder", "give the folder of images to read")
    options.require_file(opt.saved_model, "--saved_model", "give the checkpoint to run")
    options.check_output_file(opt.csv, "--csv", example="predictions.csv")


def predict(model, loader, converter, opt, device, temperature):
    """`[(path, prediction, confidence)]` for every image that decoded; `temperature`: None, a
    number (token level) or a calibration.Scaling."""
    rows = []
    with torch.no_grad():
        for images, paths, _ in loader:
            if not paths:
                continue
            with utils.autocast_context(device, opt.amp):
                logits = forward_logits(model, images.to(device), opt.batch_max_length, opt.Prediction)
            texts, confidence, _ = calibration.decode_calibrated(logits.float(), converter, temperature)
            rows.extend(zip(paths, texts, confidence.tolist()))
    return rows


def write_csv(path, rows, skipped):
    with atomic_io.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "prediction", "confidence", "status"])
            for name, text, conf in rows:
                writer.writerow([name, text, f"{conf:.6f}", "ok"])
            for name, reason in skipped:
                writer.writerow([name, "", "", f"skipped: {reason}"])


def main(opt):
    check_inputs(opt)
    options.fill_from_saved(opt, options.given_option_names(opt, get_args_parser()))
    options.resolve_options(opt)
    temperature = options.parse_temperature(opt.temperature)
    method = options.parse_calibration(opt.calibration, temperature)
    device = utils.select_device(opt.device)
    opt.amp = utils.effective_amp(opt.amp, device)
    model, converter = load_model(opt, device)
    if temperature == "auto":
        temperature = fit_temperature_on_valid_data(model, converter, opt, device, method)

    images = RawDataset(opt.image_folder, opt)
    predictions = predict(model, eval_loader(images, opt, device), converter, opt, device,
                          calibration.as_scaling(temperature, method))

    def rel(path):
        return os.path.relpath(path, opt.image_folder)

    # Files can pass RawDataset's header check and still fail to decode in full; those are
    # dropped by the collate and show up here as missing.
    done = {path for path, _, _ in predictions}
    skipped = [(rel(path), reason) for path, reason in images.skipped]
    skipped += [(rel(path), "undecodable image") for path in images.paths if path not in done]
    rows = [(rel(path), text, conf) for path, text, conf in predictions]
    if not rows:
        raise utils.UserError(f"--image_folder {opt.image_folder}: none of its {len(skipped)} image file(s) "
                              f"decodes (" + ", ".join(name for name, _ in skipped[:5])
                              + (", ..." if len(skipped) > 5 else "") + ")")

    if temperature is not None:
        print(f"confidence calibrated with temperature {temperature:g}"
              + (f" (fitted on --valid_data, {method}-level)" if method else ""))
    print(utils.format_table(["file", "prediction", "confidence"], [[n, t, f"{c:.4f}"] for n, t, c in rows],
                             align="<<>"))
    if skipped:
        print(f"skipped {len(skipped)} undecodable file(s): " + ", ".join(name for name, _ in skipped))
    if opt.csv:
        write_csv(opt.csv, rows, skipped)
        print(f"table written to {opt.csv}")
    return rows, skipped


if __name__ == "__main__":
    utils.exit_on_user_error(main)(options.parse_with_given(get_args_parser()))
