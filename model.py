"""The four-stage scene-text recognizer and its checkpoint I/O.

`Model(opt)` wires Transformation -> FeatureExtraction -> SequenceModeling -> Prediction, each
chosen by name from its registry in `modules/`. Parameter names and shapes follow the
deep-text-recognition-benchmark family, so its checkpoints load with strict=True.
Checkpoints are saved from a DataParallel wrapper there, so every key starts with `module.`;
`save_weights` writes that layout and `load_weights` accepts it with or without the prefix.
"""
import collections
import collections.abc
import dataclasses
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safe_files import atomic_io
from modules.feature_extraction import build_feature_extraction
from modules.prediction import build_prediction
from modules.sequence_modeling import build_sequence_modeling
from modules.transformation import build_transformation
from utils import UserError

PREFIX = "module."
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
MIN_IMG_H = 32  # every extractor halves the height 4 times and ends in a 2x2 valid convolution
MAX_LISTED = 10  # keys named per kind in a mismatch message


class Model(nn.Module):
    """Scene-text recognizer: `forward(input, text=None, is_train=True)` -> logits (B, T, num_class).

    `input` is (B, input_channel, H, W) in [-1, 1] (H >= 32). For CTC, T is the width of the
    feature map and `text` is ignored. For Attn, T = batch_max_length + 1; with `is_train` the
    decoder is fed `text` ((B, batch_max_length + 1), [GO] first), otherwise it decodes greedily
    from text[:, 0] (or from [GO] when text is None).

    `mc_dropout_p` (default 0.0: no effect, no parameters, nothing in the state_dict): when > 0,
    dropout with that probability is applied to the sequence features before the prediction head
    in every forward pass, in eval mode too, so that repeated passes are stochastic (MC dropout,
    as BALD in data_sampling.py needs).
    """

    def __init__(self, opt):
        super().__init__()
        if opt.imgH < MIN_IMG_H:
            raise UserError(f"--imgH {opt.imgH}: the feature extractors need an image height of at least {MIN_IMG_H}")
        self.Transformation = build_transformation(opt)
        self.FeatureExtraction = build_feature_extraction(opt)
        self.SequenceModeling = build_sequence_modeling(opt, self.FeatureExtraction.output_channel)
        self.Prediction = build_prediction(opt, self.SequenceModeling.output_size)
        self.mc_dropout_p = 0.0

    def forward(self, input, text=None, is_train=True):
        image = self.Transformation(input)
        visual = self.FeatureExtraction(image)  # B x C x H' x W'
        # average over the height: each of the W' columns becomes one step of the sequence
        sequence = visual.mean(dim=2).transpose(1, 2)  # B x W' x C
        sequence = self.SequenceModeling(sequence)
        if self.mc_dropout_p > 0:
            sequence = F.dropout(sequence, self.mc_dropout_p, training=True)
        return self.Prediction(sequence.contiguous(), text, is_train)


def unwrap(model):
    """The bare model inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def initialize_weights(model):
    """The original training script's initialisation: Kaiming-normal weights, zero biases, unit
    norm scales; localization_fc2 keeps its own (zero weight, bias = initial fiducial points)."""
    with torch.no_grad():
        for name, param in unwrap(model).named_parameters():
            if "localization_fc2" in name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("bias"):
                param.zero_()
            elif leaf.startswith("weight"):
                if param.dim() >= 2:
                    nn.init.kaiming_normal_(param)
                else:
                    param.fill_(1.0)


def state_dict_for_saving(model):
    """The model's state_dict on the CPU with every key prefixed by `module.` (the DataParallel layout)."""
    own = unwrap(model).state_dict()
    saved = collections.OrderedDict((PREFIX + key, value.detach().cpu()) for key, value in own.items())
    metadata = getattr(own, "_metadata", None)
    if metadata is not None:  # module versions, e.g. BatchNorm's, travel with the prefixed names
        saved._metadata = collections.OrderedDict(
            ((PREFIX + key) if key else PREFIX[:-1], value) for key, value in metadata.items())
    return saved


def save_weights(model, path):
    """Write `state_dict_for_saving(model)` to `path` atomically."""
    atomic_io.atomic_torch_save(state_dict_for_saving(model), path)


@dataclasses.dataclass
class LoadReport:
    """What `load_weights` did; `mismatched` holds (key, checkpoint shape, model shape)."""
    loaded: list
    missing: list
    unexpected: list
    mismatched: list

    @property
    def skipped(self):
        return self.unexpected + [key for key, _, _ in self.mismatched]

    @property
    def complete(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self):
        """One line naming the missing, unexpected and mis-shaped keys ('' when there are none)."""
        parts = []
        if self.missing:
            parts.append(f"missing keys: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {_listing(self.unexpected)}")
        if self.mismatched:
            parts.append(f"mis-shaped keys: {_listing(_shape_notes(self.mismatched))}")
        return "; ".join(parts)

    def summary(self):
        problems = self.problems()
        return f"loaded {len(self.loaded)} tensors" + (f"; not loaded: {problems}" if problems else "")

    def fine_tune_summary(self):
        """What fine-tuning starts from: the tensors loaded, those the model keeps freshly initialised
        (absent from the checkpoint, or of another shape there: e.g. the prediction layer of another
        character set) and the checkpoint's tensors the model has no place for."""
        text = f"loaded {len(self.loaded)} tensors"
        fresh = self.missing + _shape_notes(self.mismatched)
        text += f"; re-initialised: {_listing(fresh)}" if fresh else "; nothing re-initialised"
        if self.unexpected:
            text += f"; ignored from the checkpoint: {_listing(self.unexpected)}"
        return text


def _listing(names):
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _shape_notes(mismatched):
    return [f"{key} {tuple(saved)} vs model {tuple(own)}" for key, saved, own in mismatched]


def numpy_state_globals():
    """The numpy globals that rebuild the generator state and numpy floats train.py's last.pth
    holds: the only ones a checkpoint may name besides tensors."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed the module
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
            core.multiarray._reconstruct, core.multiarray.scalar]


def load_trusted(path):
    """torch.load of `path` without running code from it (weights_only), numpy's state allowed; the
    unpickler's own exception on anything else."""
    with torch.serialization.safe_globals(numpy_state_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_checkpoint(path):
    """A checkpoint's content: a state_dict (best_*.pth) or train.py's last.pth, whose `model` entry
    `_extract_state_dict` then takes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file")
    try:
        return load_trusted(path)
    except Exception as err:  # a damaged file makes the unpickler raise almost anything
        raise UserError(f"checkpoint {path}: not a plain PyTorch weights file (damaged, or it pickles "
                        f"Python objects: {type(err).__name__}); give a state_dict saved with torch.save") from None


def _extract_state_dict(checkpoint, source):
    if isinstance(checkpoint, collections.abc.Mapping):
        for key in CONTAINER_KEYS:
            if isinstance(checkpoint.get(key), collections.abc.Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, collections.abc.Mapping) or not any(
            torch.is_tensor(value) for value in checkpoint.values()):
        raise UserError(f"checkpoint {source}: holds no state_dict (expected a dict of tensors, "
                        f"possibly under one of the keys {', '.join(CONTAINER_KEYS)})")
    return collections.OrderedDict((key[len(PREFIX):] if key.startswith(PREFIX) else key, value)
                                   for key, value in checkpoint.items() if torch.is_tensor(value))


def load_weights(model, checkpoint, strict=True):
    """Load a checkpoint (a path or an already loaded dict) into `model`; returns a LoadReport.

    Keys may carry the `module.` prefix or not; the state_dict may sit under `model`,
    `state_dict` or `model_state_dict`. With strict=True any missing, unexpected or mis-shaped
    key is a UserError that lists them and nothing is loaded. With strict=False (fine-tuning)
    the tensors that fit are loaded and the rest is reported. A checkpoint without the
    `num_batches_tracked` counters (older PyTorch) is not a mismatch.
    """
    source = "(in memory)"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = _read_checkpoint(source)
    saved = _extract_state_dict(checkpoint, source)
    target = unwrap(model)
    own = target.state_dict()

    missing = [key for key in own if key not in saved and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in saved if key not in own]
    mismatched = [(key, tuple(saved[key].shape), tuple(own[key].shape)) for key in saved
                  if key in own and tuple(saved[key].shape) != tuple(own[key].shape)]
    report = LoadReport([], missing, unexpected, mismatched)
    if strict and not report.complete:
        raise UserError(f"checkpoint {source} does not fit the model built from the options "
                        f"(stages, --output_channel, --hidden_size, --num_fiducial, charset); "
                        f"{report.problems()}")

    fitting = {key: value for key, value in saved.items()
               if key in own and tuple(value.shape) == tuple(own[key].shape)}
    target.load_state_dict(fitting, strict=False)
    report.loaded = list(fitting)
    return report


STAGES = ("Transformation", "FeatureExtraction", "SequenceModeling", "Prediction")


def parse_stages(text, flag="--freeze"):
    """The stages named in a comma-separated `text`, in the model's order ('' -> none); a UserError
    naming the flag for an unknown or repeated name, or for all four (nothing left to train)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    for name in names:
        if name not in STAGES:
            raise UserError(f"{flag} {text}: unknown stage '{name}'; choose from {', '.join(STAGES)} "
                            f"(comma-separated)")
    if len(set(names)) != len(names):
        raise UserError(f"{flag} {text}: a stage appears twice")
    if len(names) == len(STAGES):
        raise UserError(f"{flag} {text}: freezes every stage, which leaves nothing to train")
    return [stage for stage in STAGES if stage in names]


def freeze_stages(model, stages):
    """Take the parameters of `stages` out of training (no gradient, so no optimizer keeps or
    updates them); returns how many numbers were frozen."""
    frozen = 0
    for stage in stages:
        for param in getattr(unwrap(model), stage).parameters():
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def hold_frozen_in_eval(model, stages):
    """Put the frozen stages back in eval mode after `model.train()`. A frozen stage must keep
    computing what it computed before: in train mode BatchNorm would normalise with each batch's
    statistics and move its running statistics (buffers, which no optimizer guards) towards the
    new data, changing the frozen stage's output under the layers that follow it; dropout too
    would stay active there."""
    for stage in stages:
        getattr(unwrap(model), stage).eval()


# Tensors indexed by class, per prediction stage: (key, dimension, how many trailing entries of
# that dimension are the classes). The attention decoder feeds the previous class back as a
# one-hot vector, so its LSTM cell's input weights end in one column per class.
CLASS_TENSORS = {
    "CTC": (("Prediction.weight", 0), ("Prediction.bias", 0)),
    "Attn": (("Prediction.generator.weight", 0), ("Prediction.generator.bias", 0),
             ("Prediction.attention_cell.rnn.weight_ih", 1)),
}


def carry_classes(checkpoint, model, prediction, old_classes, new_classes):
    """The checkpoint's state_dict (a path or a dict) with its class-indexed tensors rebuilt for
    `new_classes` (the converter's class list of this run): a class the checkpoint also has
    (`old_classes`, same name) keeps its trained row or column, a new one keeps `model`'s initial
    values. Returns `(state, carried, new)`: the state to load, and the classes carried over and
    added. Fine-tuning onto another character set then re-learns only what is new."""
    source = "(in memory)"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = _read_checkpoint(source)
    saved = _extract_state_dict(checkpoint, source)
    own = unwrap(model).state_dict()
    old_index = {name: i for i, name in enumerate(old_classes)}
    pairs = [(j, old_index[name]) for j, name in enumerate(new_classes) if name in old_index]
    for key, dim in CLASS_TENSORS[prediction]:
        if key not in saved or key not in own:
            continue
        before, fresh = saved[key], own[key].clone()
        lead_old = before.shape[dim] - len(old_classes)  # e.g. the attention cell's feature columns
        lead_new = fresh.shape[dim] - len(new_classes)
        others = [n for k, n in enumerate(before.shape) if k != dim] == [
            n for k, n in enumerate(fresh.shape) if k != dim]
        if lead_old < 0 or lead_old != lead_new or before.dim() != fresh.dim() or not others:
            continue  # not the layout the class lists describe: left to load_weights to report
        if lead_old:
            fresh.narrow(dim, 0, lead_new).copy_(before.narrow(dim, 0, lead_old))
        for j, i in pairs:
            fresh.narrow(dim, lead_new + j, 1).copy_(before.narrow(dim, lead_old + i, 1))
        saved[key] = fresh
    carried = [new_classes[j] for j, _ in pairs]
    return saved, carried, [name for name in new_classes if name not in old_index]
