"""Validation and evaluation shared by the scripts: load a saved model, run it over a loader,
decode, measure accuracy, normalised edit distance, loss and calibration, and fit a temperature
(token or word level, see measurement/calibration.py)."""
import sys
import time

import numpy as np
import torch
import torch.utils.data
from nltk.metrics.distance import edit_distance

from measurement import calibration
import options
import utils
from dataset import AlignCollate, hierarchical_dataset
from data_layer.batch_sampling import loader_worker_init
from model import Model, load_weights


def load_model(opt, device):
    """`(model, converter)`: the label converter of `opt.Prediction` over `opt.character` (it sets
    `opt.num_class`) and `Model(opt)` holding the weights of `opt.saved_model` (strictly), on
    `device`, in eval mode."""
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    model = Model(opt)
    load_weights(model, opt.saved_model, strict=True)
    model.to(device).eval()
    if getattr(opt, "amp", False):
        # with autocast the convolutions run fastest on channels-last weights (measured by tools/benchmark.py)
        model.to(memory_format=torch.channels_last)
    return model, converter


def eval_loader(data, opt, device):
    """Batches of `data` in order, as inference reads them (undecodable images dropped)."""
    collate = AlignCollate(imgH=opt.imgH, imgW=opt.imgW, keep_ratio_with_pad=opt.PAD, channels=3 if opt.rgb else 1)
    return torch.utils.data.DataLoader(data, batch_size=opt.batch_size, shuffle=False, num_workers=opt.workers,
                                       collate_fn=collate, pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=opt.workers > 0, worker_init_fn=loader_worker_init)


def rank_share(data, rank, world_size):
    """This process's share of `data` when several score it together: every world_size-th item
    from `rank` (all of it for one process)."""
    if world_size == 1:
        return data
    return torch.utils.data.Subset(data, range(rank, len(data), world_size))


def show_progress(opt, rank=0):
    """Progress bars on rank 0 only, on a terminal, unless --no_progress."""
    return rank == 0 and not opt.no_progress and sys.stderr.isatty()


def concatenate_columns(parts):
    """One dict of columns from several (one per process): arrays concatenated, lists chained."""
    merged = {}
    for key in parts[0]:
        if isinstance(parts[0][key], np.ndarray):
            merged[key] = np.concatenate([p[key] for p in parts])
        else:
            merged[key] = [x for p in parts for x in p[key]]
    return merged


def forward_logits(model, images, batch_max_length, prediction, text=None):
    """Greedy (inference) logits. Attn decodes `batch_max_length + 1` steps from [GO]."""
    batch_size = images.size(0)
    if text is None:
        text = torch.zeros(batch_size, batch_max_length + 1, dtype=torch.long, device=images.device)
    return model(images, text, is_train=False)


def teacher_forced_logits(model, images, text):
    """Attn logits of the decoder fed the label: `text` is the converter's encoding ([GO], the
    characters, [s], padding) and the decoder reads its first batch_max_length + 1 columns, so
    step t is conditioned on the label's prefix (its targets are text[:, 1:])."""
    return model(images, text[:, :-1], is_train=True)


def normalized_edit_similarity(pred, gt):
    """ICDAR 2019 normalised edit distance of one pair, as 1 - ED / max length (1 = identical)."""
    if len(gt) == 0 or len(pred) == 0:
        return 1.0 if len(gt) == len(pred) else 0.0
    return 1.0 - edit_distance(pred, gt) / max(len(gt), len(pred))


def evaluate(model, loader, converter, opt, device, criterion=None, amp=False, temperature=None,
             max_samples_kept=0, compare_temperatures=None):
    """Evaluate `model` on every batch of `loader`.

    `temperature`: None, a number (token level) or a `calibration.Scaling`. Returns a dict with
    accuracy (%), norm_ED, valid_loss (criterion on the greedy logits, when a criterion is given),
    the calibration metrics, images_per_s, n, plus `confidence` and `correct` tensors and up to
    `max_samples_kept` example (gt, pred, confidence) triples. With `compare_temperatures` ({name:
    Scaling, number or None}), also `confidence_at` {name: the word confidence of the same readings
    under that scaling (None: unscaled)}, from the same pass."""
    was_training = model.training
    model.eval()
    loss_avg = utils.Averager()
    confidences, corrects = [], []
    compared = {name: [] for name in (compare_temperatures or {})}
    similarity_sum = 0.0
    examples = []
    n = 0
    images_seen = 0
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels, _ in loader:
            if len(labels) == 0:
                continue
            images = images.to(device, non_blocking=True)
            with utils.autocast_context(device, amp):
                logits = forward_logits(model, images, opt.batch_max_length, opt.Prediction)
            logits = logits.float()
            if criterion is not None:
                text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
                text, length = text.to(device), length.to(device)
                target = text if opt.Prediction == "CTC" else text[:, 1:]
                loss_avg.add(criterion(logits, target, length, (0, 1)), len(labels))
            for name, other in (compare_temperatures or {}).items():
                compared[name].append(calibration.decode_calibrated(logits, converter, other)[1])
            texts, word_conf, _ = calibration.decode_calibrated(logits, converter, temperature)
            correct = torch.tensor([p == g for p, g in zip(texts, labels)], dtype=torch.float32)
            similarity_sum += sum(normalized_edit_similarity(p, g) for p, g in zip(texts, labels))
            confidences.append(word_conf.cpu())
            corrects.append(correct)
            for gt, pred, conf in zip(labels, texts, word_conf.tolist()):
                if len(examples) >= max_samples_kept:
                    break
                examples.append((gt, pred, conf))
            n += len(labels)
            images_seen += images.size(0)
    elapsed = time.perf_counter() - start
    if was_training:
        model.train()
    confidence = torch.cat(confidences) if confidences else torch.zeros(0)
    correct = torch.cat(corrects) if corrects else torch.zeros(0)
    metrics = calibration.calibration_metrics(confidence, correct, bins=getattr(opt, "bins", 15))
    result = {
        "n": n,
        "accuracy": 100.0 * correct.mean().item() if n else float("nan"),
        "norm_ED": similarity_sum / n if n else float("nan"),
        "valid_loss": loss_avg.val() if criterion is not None and n else float("nan"),
        "ece": metrics["ece"],
        "ace": metrics["ace"],
        "mce": metrics["mce"],
        "brier": metrics["brier"],
        "images_per_s": images_seen / elapsed if elapsed > 0 else float("nan"),
        "confidence": confidence,
        "correct": correct,
        "examples": examples,
    }
    if compare_temperatures is not None:
        result["confidence_at"] = {name: torch.cat(parts) if parts else torch.zeros(0)
                                   for name, parts in compared.items()}
    return result


def logits_pass(method, prediction):
    """Which logits the temperature `method` is fitted on: `forced` (teacher-forced on the label)
    for Attn at the token level, `greedy` otherwise. The token NLL scores every label token given
    the label's prefix: on greedy logits, once the reading slips a character (a deletion, an
    insertion), every later label token would be scored against a step conditioned on another
    prefix, and T would absorb that misalignment, not the model's over- or under-confidence. The
    word level judges the greedy reading, so it needs the greedy pass; a CTC model has no decoder
    to feed (its logits do not depend on the text)."""
    return "forced" if method == "token" and prediction != "CTC" else "greedy"


def collect_logits(model, loader, converter, opt, device, amp=False, passes=("greedy",)):
    """`({pass: [logits (fp32, on the CPU), one tensor per batch]}, labels)` of every sample in
    `loader`, for each of `passes`: `greedy` (the model's own readings, `forward_logits`) and
    `forced` (Attn: `teacher_forced_logits` on the label, encoded by `converter`)."""
    logits, labels = {name: [] for name in passes}, []
    with torch.no_grad():
        for images, batch_labels, _ in loader:
            if len(batch_labels) == 0:
                continue
            images = images.to(device)
            with utils.autocast_context(device, amp):
                if "greedy" in logits:
                    logits["greedy"].append(forward_logits(model, images, opt.batch_max_length, opt.Prediction)
                                            .float().cpu())
                if "forced" in logits:
                    text, _ = converter.encode(batch_labels, batch_max_length=opt.batch_max_length)
                    logits["forced"].append(teacher_forced_logits(model, images, text.to(device)).float().cpu())
            labels.extend(batch_labels)
    return logits, labels


def fit_temperature_on_logits(logits, labels, converter, opt, method="token"):
    """The temperature of `method` for (B, T, C) `logits` and their `labels`, the logits of the
    pass `logits_pass(method, opt.Prediction)` names.
    token: minimising the NLL of the labels (Attn: the `text[:, 1:]` tokens, [s] included, under
    teacher-forced logits; CTC: the CTC form). word: minimising the binary NLL of each greedy
    reading being right under its raw word confidence ** (1 / T) (`calibration.fit_word_temperature`)."""
    if method == "word":
        texts = utils.decode_predictions(logits, converter)[0]
        correct = torch.tensor([p == g for p, g in zip(texts, labels)], dtype=torch.float64)
        return calibration.fit_word_temperature(calibration.word_confidence(logits, converter), correct)
    if method != "token":
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(calibration.METHODS)}")
    text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
    if opt.Prediction == "CTC":
        return float(calibration.fit_temperature(logits, text, target_lengths=length))
    return float(calibration.fit_temperature(logits, text[:, 1:]))


def fit_temperatures_on_loader(model, loader, converter, opt, device, methods=("token",), amp=False,
                               source="the loader"):
    """{method: temperature} for each of `methods`, from one pass over `loader` (each batch run
    greedily, teacher-forced or both, as the methods need: see `logits_pass` and
    `fit_temperature_on_logits`). `source` names the data in the error raised when no sample is
    readable."""
    passes = {method: logits_pass(method, opt.Prediction) for method in methods}
    logits, labels = collect_logits(model, loader, converter, opt, device, amp, tuple(dict.fromkeys(passes.values())))
    if not labels:
        raise utils.UserError(f"{source}: no readable sample to fit the temperature on")
    logits = {name: torch.cat(parts) for name, parts in logits.items()}
    return {method: float(fit_temperature_on_logits(logits[passes[method]], labels, converter, opt, method))
            for method in methods}


def fit_temperature_on_loader(model, loader, converter, opt, device, amp=False, source="the loader", method="token"):
    """The temperature of `method` (token or word) fitted on the samples of `loader`."""
    return fit_temperatures_on_loader(model, loader, converter, opt, device, (method,), amp, source)[method]


def fit_temperatures_on_valid_data(model, converter, opt, device, methods):
    """`--temperature auto`: {method: temperature} fitted on every sample of `--valid_data`."""
    hint = "--temperature auto fits the temperature on it (or give --temperature none or a number)"
    options.require_dir(opt.valid_data, "--valid_data", hint, if_absent=hint)
    valid_set, _ = hierarchical_dataset(opt.valid_data, opt, select_data="/", flag="--valid_data")
    if len(valid_set) == 0:
        raise utils.UserError(f"--valid_data {opt.valid_data}: no samples to fit the temperature on")
    return fit_temperatures_on_loader(model, eval_loader(valid_set, opt, device), converter, opt, device, methods,
                                      amp=opt.amp, source=f"--valid_data {opt.valid_data}")


def fit_temperature_on_valid_data(model, converter, opt, device, method="token"):
    """`--temperature auto`: one temperature of `method` (token or word) fitted on `--valid_data`."""
    return fit_temperatures_on_valid_data(model, converter, opt, device, (method,))[method]
