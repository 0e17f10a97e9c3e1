"""Train a scene-text recognizer: the base round (`--mode base`) or an active-learning round
(`--mode al`) on the labelled data plus every queried set, with a training-time calibrator and
calibration measured at every validation.

    python train.py --train_data data/train_data_lmdb --valid_data data/test_data_lmdb \
        --select_data CVPR2016-NIPS2014 --batch_ratio 0.5-0.5 --Transformation TPS \
        --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn ...

Runs as `python train.py` on one device, or `torchrun --nproc_per_node N train.py` with
DistributedDataParallel (rank 0 logs, validates and saves)."""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

import calibrators
import options
import utils
from dataset import Batch_Balanced_Dataset, hierarchical_dataset
from evaluation import eval_loader, evaluate
from model import Model, initialize_weights, load_weights, save_weights, state_dict_for_saving


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Train a recognizer for one round of active learning (base or al).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_data_args(parser)
    options.add_model_args(parser, required=True)
    options.add_runtime_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--exp_name", default="", help="output folder name under --output_dir (default: from "
                       "architecture, seed, query_iter, mode, calibrator and alpha)")
    group.add_argument("--output_dir", default="saved_models", help="root of the experiment folders")
    group.add_argument("--num_iter", type=int, default=300000, help="number of iterations to train for")
    group.add_argument("--valInterval", type=int, default=2000, help="validate every this many iterations")
    group.add_argument("--saved_model", default="", help="checkpoint to start from (the last round's model)")
    group.add_argument("--FT", action="store_true", help="fine-tune: load what fits from --saved_model, skip the rest")
    group.add_argument("--resume", nargs="?", const="auto", default="",
                       help="continue from a last.pth (default: the one in this experiment's folder)")
    group.add_argument("--adam", action="store_true", help="Adam instead of Adadelta")
    group.add_argument("--lr", type=float, default=1.0, help="learning rate (Adadelta's default 1)")
    group.add_argument("--beta1", type=float, default=0.9, help="beta1 of Adam")
    group.add_argument("--rho", type=float, default=0.95, help="decay rate rho of Adadelta")
    group.add_argument("--eps", type=float, default=1e-8, help="eps of Adadelta")
    group.add_argument("--grad_clip", type=float, default=5.0, help="gradient norm clipping")
    group.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                       help="learning-rate schedule after warm-up")
    group.add_argument("--warmup_iters", type=int, default=0, help="linear learning-rate warm-up iterations")
    group.add_argument("--calibrator", default="CE",
                       help="training loss: " + ", ".join(calibrators.CALIBRATORS))
    group.add_argument("--alpha", type=float, default=0.0,
                       help="smoothing mass for LS/boost_*/robust, focal gamma for FL")
    group.add_argument("--beta", type=float, default=0.95, help="weight of the given label in boost_soft/boost_hard")
    group.add_argument("--smooth_tail", type=float, default=0.0, help="see the calibrator table in README")
    group.add_argument("--B", type=float, default=16.0, help="exponential base of robust's global trust")
    group.add_argument("--t", type=float, default=0.5, help="transition point (fraction of training) of robust")
    group.add_argument("--patience", type=int, default=1000000,
                       help="stop after this many validations without a lower ECE (counted once the model reads some words)")
    group.add_argument("--mode", choices=("base", "al"), default="base",
                       help="base: labelled part only; al: labelled parts plus the query sets in --select_data")
    group.add_argument("--query_iter", default="", help="name of this round, part of the default --exp_name")
    group.add_argument("--noise_ratio", type=float, default=0.0, help="share of labels given one wrong character")
    group.add_argument("--noise_scope", choices=("queried", "all"), default="queried",
                       help="which labels the simulated annotator noise touches")
    group.add_argument("--channels_last", action="store_true",
                       help="channels-last memory format for the convolutional stages (always on with --amp)")
    return parser


def default_exp_name(opt):
    parts = [opt.Transformation, opt.FeatureExtraction, opt.SequenceModeling, opt.Prediction,
             f"Seed{opt.manualSeed}"]
    if opt.query_iter:
        parts.append(opt.query_iter)
    parts += [opt.mode, opt.calibrator, f"alpha{opt.alpha:g}"]
    return "-".join(parts)


def make_optimizer(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.adam:
        return torch.optim.Adam(params, lr=opt.lr, betas=(opt.beta1, 0.999))
    return torch.optim.Adadelta(params, lr=opt.lr, rho=opt.rho, eps=opt.eps)


def learning_rate_factor(iteration, opt):
    if opt.warmup_iters and iteration < opt.warmup_iters:
        return (iteration + 1) / opt.warmup_iters
    if opt.lr_schedule == "cosine":
        span = max(opt.num_iter - opt.warmup_iters, 1)
        progress = min(max(iteration - opt.warmup_iters, 0) / span, 1.0)
        return 0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * progress))
    return 1.0


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(model, batch, converter, criterion, optimizer, scaler, opt, device, iteration):
    images, labels, _ = batch
    images = images.to(device, non_blocking=True)
    if opt.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
    text, length = text.to(device), length.to(device)
    progress = (iteration, opt.num_iter)
    with utils.autocast_context(device, opt.amp):
        if opt.Prediction == "CTC":
            logits = model(images, text)
            target = text
        else:
            logits = model(images, text[:, :-1])
            target = text[:, 1:]
    loss = criterion(logits.float(), target, length, progress)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def validation_block(iteration, opt, train_loss, result, best, elapsed):
    lines = [f"[{iteration}/{opt.num_iter}] train loss {train_loss:.4f}  valid loss {result['valid_loss']:.4f}  "
             f"elapsed {elapsed:.1f}s",
             f"  accuracy {result['accuracy']:.2f}%  norm_ED {result['norm_ED']:.4f}  ECE {result['ece']:.4f}  "
             f"ACE {result['ace']:.4f}  MCE {result['mce']:.4f}  Brier {result['brier']:.4f}",
             f"  best accuracy {best['accuracy']:.2f}%  best ECE {best['ece']:.4f}",
             f"  {'ground truth':25s} | {'prediction':25s} | confidence"]
    for gt, pred, conf in result["examples"]:
        mark = "ok " if gt == pred else "err"
        lines.append(f"  {gt:25s} | {pred:25s} | {conf:.4f} {mark}")
    return "\n".join(lines)


def check_data_paths(opt):
    for flag in ("train_data", "valid_data"):
        options.require_dir(getattr(opt, flag), f"--{flag}", "give the root folder of the LMDB datasets",
                            if_absent="run `make data` or point it at your LMDBs")


def main(opt):
    options.resolve_options(opt)
    check_data_paths(opt)
    if not 0.0 <= opt.noise_ratio <= 1.0:
        raise utils.UserError(f"--noise_ratio {opt.noise_ratio}: must lie between 0 and 1")
    if opt.valInterval < 1 or opt.num_iter < 1:
        raise utils.UserError("--num_iter and --valInterval must be at least 1")
    rank, world_size, local_rank, distributed = utils.init_distributed()
    is_main = rank == 0
    device = utils.select_device(opt.device, local_rank)
    utils.set_seed(opt.manualSeed)
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    criterion = calibrators.get_calibrator(opt.calibrator, opt)
    valid_criterion = calibrators.get_calibrator("CE", opt)
    if not opt.exp_name:
        opt.exp_name = default_exp_name(opt)
    save_dir = os.path.join(opt.output_dir, opt.exp_name)
    if opt.resume == "auto":
        opt.resume = os.path.join(save_dir, "last.pth")
    if opt.resume and not os.path.isfile(opt.resume):
        raise utils.UserError(f"--resume {opt.resume}: no such checkpoint; train once without --resume first")
    if opt.mode == "al" and not opt.saved_model and not opt.resume and is_main:
        print("warning: --mode al without --saved_model starts from random weights", file=sys.stderr)

    train_dataset = Batch_Balanced_Dataset(opt, rank=rank, world_size=world_size)
    if is_main:
        valid_set, valid_log = hierarchical_dataset(opt.valid_data, opt, select_data="/", flag="--valid_data")
        valid_loader = eval_loader(valid_set, opt, device)
        print(valid_log)
        # the experiment folder appears only once the data has been found and checked
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, "log_dataset.txt"), "a", encoding="utf-8") as log_dataset:
            log_dataset.write(train_dataset.log_text + valid_log + "\n")

    model = Model(opt)
    initialize_weights(model)
    if opt.saved_model:
        report = load_weights(model, opt.saved_model, strict=not opt.FT)
        if is_main:
            print(f"loaded {opt.saved_model}" + (f" ({report})" if opt.FT else ""))
    model.to(device)
    if opt.channels_last or opt.amp:
        # with autocast the convolutions run fastest on channels-last weights (tools/benchmark.py)
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, opt)
    use_scaler = opt.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_iter = 0
    best = {"accuracy": -1.0, "ece": float("inf"), "norm_ED": -1.0}
    stale_validations = 0
    if opt.resume:
        state = torch.load(opt.resume, map_location="cpu", weights_only=False)
        load_weights(model, state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter = state["iteration"]
        best = state["best"]
        stale_validations = state.get("stale_validations", 0)
        set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {opt.resume} at iteration {start_iter}")

    train_model = model
    if distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    if is_main:
        options.save_opt_yaml(opt, os.path.join(save_dir, "opt.yaml"))
        log_train = utils.Logger(os.path.join(save_dir, "log_train.txt"))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log_train.log(f"{opt.exp_name}: {n_params:,} trainable parameters on {device}"
                      f"{f' x {world_size} processes' if distributed else ''}, amp={'on' if opt.amp else 'off'}")
        if train_dataset.num_corrupted:
            log_train.log(f"simulated annotator noise: {train_dataset.num_corrupted} labels corrupted "
                          f"(noise_ratio {opt.noise_ratio}, scope {opt.noise_scope})")

    def save_last(iteration):
        if not is_main:
            return
        utils.atomic_torch_save({
            "model": state_dict_for_saving(model), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None, "iteration": iteration, "best": best,
            "stale_validations": stale_validations, "rng": rng_state(), "opt": vars(opt),
        }, os.path.join(save_dir, "last.pth"))

    base_lrs = [group["lr"] for group in optimizer.param_groups]
    loss_avg = utils.Averager()
    start_time = time.time()
    iteration = start_iter
    show_progress = is_main and not opt.no_progress and sys.stdout.isatty()
    progress_bar = tqdm(total=opt.num_iter, initial=start_iter, disable=not show_progress, dynamic_ncols=True)
    try:
        while iteration < opt.num_iter:
            factor = learning_rate_factor(iteration, opt)
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * factor
            loss = train_step(train_model, train_dataset.get_batch(), converter, criterion, optimizer, scaler,
                              opt, device, iteration)
            loss_avg.add(loss)
            iteration += 1
            progress_bar.update(1)
            if iteration == 1 or iteration % opt.valInterval == 0 or iteration == opt.num_iter:
                stop = False
                if is_main:
                    result = evaluate(model, valid_loader, converter, opt, device, criterion=valid_criterion,
                                      amp=opt.amp, max_samples_kept=5)
                    # A model that reads nothing, at confidence ~0, is trivially calibrated: only a
                    # model that reads some words can become the best-calibrated one.
                    improved_ece = result["accuracy"] > 0 and result["ece"] < best["ece"]
                    if result["accuracy"] > best["accuracy"]:
                        best["accuracy"] = result["accuracy"]
                        save_weights(model, os.path.join(save_dir, "best_accuracy.pth"))
                        utils.reliability_diagram(result["confidence"], result["correct"],
                                                  os.path.join(save_dir, "reliability_best_accuracy.png"),
                                                  bins=opt.bins, title=f"best accuracy, iteration {iteration}")
                    if improved_ece:
                        best["ece"] = result["ece"]
                        save_weights(model, os.path.join(save_dir, "best_calibration.pth"))
                        stale_validations = 0
                    elif best["ece"] != float("inf"):
                        stale_validations += 1
                    best["norm_ED"] = max(best["norm_ED"], result["norm_ED"])
                    utils.reliability_diagram(result["confidence"], result["correct"],
                                              os.path.join(save_dir, "reliability_latest.png"),
                                              bins=opt.bins, title=f"iteration {iteration}")
                    elapsed = time.time() - start_time
                    record = {"iteration": iteration, "train_loss": loss_avg.val(), "lr": optimizer.param_groups[0]["lr"],
                              **{k: result[k] for k in ("valid_loss", "accuracy", "norm_ED", "ece", "ace", "mce",
                                                        "brier")},
                              "elapsed": elapsed}
                    with open(os.path.join(save_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    block = validation_block(iteration, opt, loss_avg.val(), result, best, elapsed)
                    if train_dataset.skipped_images:
                        block += "\n  " + train_dataset.skipped_report()
                    progress_bar.clear()
                    log_train.log(block)
                    loss_avg.reset()
                    save_last(iteration)
                    stop = stale_validations >= opt.patience
                    if stop:
                        log_train.log(f"early stop: ECE did not improve for {opt.patience} validations")
                stop = utils.broadcast_flag(stop) if distributed else stop
                if stop:
                    break
    except KeyboardInterrupt:
        progress_bar.close()
        save_last(iteration)
        if is_main:
            print(f"\ninterrupted at iteration {iteration}; {os.path.join(save_dir, 'last.pth')} saved, "
                  f"continue with --resume", file=sys.stderr)
        sys.exit(130)
    progress_bar.close()
    if is_main:
        log_train.log(f"finished at iteration {iteration}: best accuracy {best['accuracy']:.2f}%, "
                      f"best ECE {best['ece']:.4f}; models in {save_dir}")
        utils.atomic_write_text(os.path.join(save_dir, "train_summary.json"), json.dumps({
            "iterations": iteration, "best": best, "seconds": time.time() - start_time,
            "labelled_samples": dict(train_dataset.num_samples),
            "labelled_total": sum(train_dataset.num_samples.values()),
            "corrupted_labels": train_dataset.num_corrupted, "select_data": opt.select_data,
            "batch_ratio": opt.batch_ratio, "mode": opt.mode, "calibrator": opt.calibrator}, indent=2))
    if distributed:
        torch.distributed.destroy_process_group()
    return save_dir


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
