"""Validation and evaluation shared by train.py and test.py: run a model over a loader, decode,
and measure accuracy, normalised edit distance, loss and calibration."""
import time

import torch
from nltk.metrics.distance import edit_distance

import utils


def forward_logits(model, images, batch_max_length, prediction, text=None):
    """Greedy (inference) logits. Attn decodes `batch_max_length + 1` steps from [GO]."""
    batch_size = images.size(0)
    if text is None:
        text = torch.zeros(batch_size, batch_max_length + 1, dtype=torch.long, device=images.device)
    return model(images, text, is_train=False)


def normalized_edit_similarity(pred, gt):
    """ICDAR 2019 normalised edit distance of one pair, as 1 - ED / max length (1 = identical)."""
    if len(gt) == 0 or len(pred) == 0:
        return 1.0 if len(gt) == len(pred) else 0.0
    return 1.0 - edit_distance(pred, gt) / max(len(gt), len(pred))


def evaluate(model, loader, converter, opt, device, criterion=None, amp=False, temperature=None,
             max_samples_kept=0):
    """Evaluate `model` on every batch of `loader`.

    Returns a dict with accuracy (%), norm_ED, valid_loss (criterion on the greedy logits, when a
    criterion is given), the calibration metrics, images_per_s, n, plus `confidence` and `correct`
    tensors and up to `max_samples_kept` example (gt, pred, confidence) triples."""
    was_training = model.training
    model.eval()
    loss_avg = utils.Averager()
    confidences, corrects = [], []
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
            if temperature is not None:
                logits = utils.apply_temperature(logits, temperature)
            texts, word_conf, _ = utils.decode_predictions(logits, converter)
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
    metrics = utils.calibration_metrics(confidence, correct, bins=getattr(opt, "bins", 15))
    return {
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
