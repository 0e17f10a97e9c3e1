"""The recognizer: stage shapes, reference state_dicts, checkpoint I/O, decoding, TPS geometry,
channels_last / autocast, MC dropout. Small models on CPU."""
import argparse
import itertools
import pathlib
import re

import pytest
import torch
import torch.nn as nn

import model as model_lib
from model import LoadReport, Model, initialize_weights, load_weights, save_weights, state_dict_for_saving
from modules.transformation import GridGenerator, fiducial_points
from utils import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "reference"

torch.set_num_threads(1)

# small sizes: imgH must stay 32 (4 halvings and a 2x2 valid convolution), imgW = 40 gives
# W/4 - 1 = 9 columns for VGG and W/4 + 1 = 11 for RCNN and ResNet
SMALL = dict(imgH=32, imgW=40, input_channel=1, output_channel=32, hidden_size=16, num_fiducial=6,
             num_class=7, batch_max_length=5)
COLUMNS = {"VGG": 9, "RCNN": 11, "ResNet": 11}


def make_opt(stages="None-VGG-None-CTC", **overrides):
    names = ("Transformation", "FeatureExtraction", "SequenceModeling", "Prediction")
    values = dict(SMALL, **dict(zip(names, stages.split("-"))))
    values.update(overrides)
    return argparse.Namespace(**values)


def small_model(stages, seed=0, **overrides):
    torch.manual_seed(seed)
    return Model(make_opt(stages, **overrides)).eval()


def images(batch=2, height=32, width=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, height, width, generator=generator) * 2 - 1


# --------------------------------------------------------------------------- stage shapes


@pytest.mark.parametrize("extractor", ["VGG", "RCNN", "ResNet"])
def test_feature_extractor_output_shape(extractor):
    net = small_model(f"None-{extractor}-None-CTC").FeatureExtraction
    assert net(images()).shape == (2, 32, 1, COLUMNS[extractor])


@pytest.mark.parametrize("transformation, extractor, sequence, head", list(itertools.product(
    ["None", "TPS"], ["VGG", "RCNN", "ResNet"], ["None", "BiLSTM"], ["CTC", "Attn"])))
def test_model_output_shape(transformation, extractor, sequence, head):
    net = small_model(f"{transformation}-{extractor}-{sequence}-{head}")
    text = torch.zeros(2, SMALL["batch_max_length"] + 1, dtype=torch.long)
    with torch.no_grad():
        train_out = net(images(), text, is_train=True)
        test_out = net(images(), text, is_train=False)
    steps = COLUMNS[extractor] if head == "CTC" else SMALL["batch_max_length"] + 1
    assert train_out.shape == test_out.shape == (2, steps, SMALL["num_class"])


def test_sequence_stage_width_sets_prediction_input():
    # with BiLSTM the head reads hidden_size features, without it output_channel features
    assert small_model("None-VGG-BiLSTM-CTC").Prediction.in_features == SMALL["hidden_size"]
    assert small_model("None-VGG-None-CTC").Prediction.in_features == SMALL["output_channel"]
    lstm_net = small_model("None-VGG-BiLSTM-CTC")
    sequence = torch.randn(2, 9, SMALL["output_channel"])
    assert lstm_net.SequenceModeling(sequence).shape == (2, 9, SMALL["hidden_size"])


def test_tps_output_has_the_configured_size_whatever_the_input_size():
    tps = small_model("TPS-VGG-None-CTC").Transformation
    assert tps(images(height=48, width=64)).shape == (2, 1, 32, 40)


@pytest.mark.parametrize("flag, value", [("Transformation", "STN"), ("FeatureExtraction", "VGG16"),
                                          ("SequenceModeling", "LSTM"), ("Prediction", "CTCAttn")])
def test_unknown_stage_name_lists_known_names(flag, value):
    known = {"Transformation": "None, TPS", "FeatureExtraction": "VGG, RCNN, ResNet",
             "SequenceModeling": "None, BiLSTM", "Prediction": "CTC, Attn"}[flag]
    with pytest.raises(UserError, match=re.escape(f"--{flag} {value}: unknown; choose one of {known}")):
        Model(make_opt("None-VGG-None-CTC", **{flag: value}))


@pytest.mark.parametrize("overrides, flag", [({"num_fiducial": 7}, "--num_fiducial 7"),
                                             ({"num_fiducial": 2}, "--num_fiducial 2"),
                                             ({"imgH": 16}, "--imgH 16"),
                                             ({"output_channel": 8}, "--output_channel 8")])
def test_unusable_sizes_are_user_errors(overrides, flag):
    with pytest.raises(UserError, match=re.escape(flag)):
        Model(make_opt("TPS-ResNet-None-CTC", **overrides))


# --------------------------------------------------------------------------- reference state_dicts


def read_reference(path):
    lines = path.read_text().splitlines()
    name, sizes = lines[0][2:].split(": ")
    stages = dict(zip(("Transformation", "FeatureExtraction", "SequenceModeling", "Prediction"), name.split("-")))
    options = {key: int(value) for key, value in (item.split("=") for item in sizes.split())}
    entries = [line for line in lines if not line.startswith("#")]
    return argparse.Namespace(batch_max_length=25, **stages, **options), entries


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.state_dict.txt")), ids=lambda p: p.name.split(".")[0])
def test_state_dict_matches_reference(path):
    opt, entries = read_reference(path)
    net = Model(opt)
    mine = [f"module.{key}\t{tuple(value.shape)}\t{str(value.dtype).replace('torch.', '')}"
            for key, value in net.state_dict().items()]
    assert mine == entries
    # the feature width the reference README gives for imgW = 100: 24 for VGG, 26 otherwise
    with torch.no_grad():
        features = net.eval().FeatureExtraction(torch.zeros(1, 1, 32, 100))
    assert features.shape == (1, 512, 1, 24 if opt.FeatureExtraction == "VGG" else 26)


def test_reference_file_set_is_complete():
    assert len(list(REFERENCE.glob("*.state_dict.txt"))) == 3


# --------------------------------------------------------------------------- checkpoints


def predictions(net, x):
    with torch.no_grad():
        return net(x, None, is_train=False)


def test_saved_checkpoint_has_single_module_prefix_and_predicts_the_same(tmp_path):
    source = small_model("TPS-ResNet-BiLSTM-Attn", seed=1)
    path = tmp_path / "best_accuracy.pth"
    save_weights(nn.DataParallel(source), path)  # the wrapper is unwrapped before saving
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["module." + key for key in source.state_dict()]

    target = small_model("TPS-ResNet-BiLSTM-Attn", seed=2)
    assert not torch.equal(predictions(target, images()), predictions(source, images()))
    report = load_weights(target, path)
    assert report.complete and len(report.loaded) == len(saved)
    assert torch.equal(predictions(target, images()), predictions(source, images()))


@pytest.mark.parametrize("layout", ["plain", "prefixed", "under_model", "under_state_dict",
                                    "under_model_state_dict"])
def test_checkpoint_layouts_load_the_same(layout, tmp_path):
    source = small_model("None-VGG-BiLSTM-CTC", seed=1)
    plain = source.state_dict()
    checkpoint = {
        "plain": plain,
        "prefixed": state_dict_for_saving(source),
        "under_model": {"model": plain, "iteration": 7},
        "under_state_dict": {"state_dict": state_dict_for_saving(source)},
        "under_model_state_dict": {"model_state_dict": plain, "optimizer": {}},
    }[layout]
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    for given in (checkpoint, path, str(path)):
        target = small_model("None-VGG-BiLSTM-CTC", seed=2)
        load_weights(nn.DataParallel(target), given)
        assert torch.equal(predictions(target, images()), predictions(source, images()))


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match=re.escape(f"checkpoint {missing}: no such file")):
        load_weights(small_model("None-VGG-None-CTC"), missing)


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match=re.escape(f"checkpoint {path}: not a plain PyTorch weights file")):
        load_weights(small_model("None-VGG-None-CTC"), path)
    with pytest.raises(UserError, match="holds no state_dict"):
        load_weights(small_model("None-VGG-None-CTC"), {"iteration": 3})


def test_strict_mismatch_lists_missing_unexpected_and_misshaped_keys():
    checkpoint = small_model("None-VGG-BiLSTM-Attn", num_class=9).state_dict()
    del checkpoint["SequenceModeling.1.linear.bias"]
    checkpoint["Extra.weight"] = torch.zeros(3)
    target = small_model("None-VGG-BiLSTM-Attn", num_class=7)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(UserError) as caught:
        load_weights(target, checkpoint)
    message = str(caught.value)
    assert "\n" not in message
    assert "missing keys: SequenceModeling.1.linear.bias" in message
    assert "unexpected keys: Extra.weight" in message
    # 7 vs 9 classes: the one-hot part of the LSTMCell input (16 + 9 = 25 vs 16 + 7 = 23) and the generator
    assert "Prediction.attention_cell.rnn.weight_ih (64, 25) vs model (64, 23)" in message
    assert "Prediction.generator.weight (9, 16) vs model (7, 16)" in message
    assert "Prediction.generator.bias (9,) vs model (7,)" in message
    # nothing was loaded
    assert all(torch.equal(before[key], value) for key, value in target.state_dict().items())


def test_non_strict_load_skips_misshaped_keys_and_loads_the_rest():
    source = small_model("None-VGG-BiLSTM-Attn", seed=1, num_class=9)
    target = small_model("None-VGG-BiLSTM-Attn", seed=2, num_class=7)
    own_generator = target.Prediction.generator.weight.detach().clone()
    report = load_weights(target, state_dict_for_saving(source), strict=False)
    assert isinstance(report, LoadReport)
    assert sorted(report.skipped) == ["Prediction.attention_cell.rnn.weight_ih", "Prediction.generator.bias",
                                      "Prediction.generator.weight"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source.state_dict()) - 3
    assert "mis-shaped keys: " in report.summary()
    assert torch.equal(target.Prediction.generator.weight, own_generator)
    for key in ("FeatureExtraction.ConvNet.0.weight", "SequenceModeling.1.rnn.weight_hh_l0",
                "Prediction.attention_cell.i2h.weight"):
        assert torch.equal(target.state_dict()[key], source.state_dict()[key])


def test_checkpoint_without_batchnorm_counters_still_loads_strictly():
    source = small_model("None-VGG-None-CTC", seed=1)
    checkpoint = {key: value for key, value in source.state_dict().items() if "num_batches_tracked" not in key}
    target = small_model("None-VGG-None-CTC", seed=2)
    assert load_weights(target, checkpoint).complete
    assert torch.equal(predictions(target, images()), predictions(source, images()))


# --------------------------------------------------------------------------- attention decoding


def test_greedy_decoding_feeds_back_its_own_predictions():
    net = small_model("None-ResNet-BiLSTM-Attn", seed=3)
    x = images(batch=3)
    greedy = predictions(net, x)
    assert greedy.shape == (3, SMALL["batch_max_length"] + 1, SMALL["num_class"])
    # teacher forcing on [GO] + the greedy argmax must reproduce the greedy pass step for step
    own = torch.cat([torch.zeros(3, 1, dtype=torch.long), greedy.argmax(2)[:, :-1]], dim=1)
    with torch.no_grad():
        forced = net(x, own, is_train=True)
    torch.testing.assert_close(forced, greedy, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_ignores_text_beyond_go():
    net = small_model("None-VGG-BiLSTM-Attn", seed=3)
    zeros = torch.zeros(2, SMALL["batch_max_length"] + 1, dtype=torch.long)
    noise = torch.randint(1, SMALL["num_class"], zeros.shape)
    noise[:, 0] = 0
    with torch.no_grad():
        assert torch.equal(net(images(), zeros, is_train=False), net(images(), noise, is_train=False))
        assert torch.equal(net(images(), zeros, is_train=False), net(images(), None, is_train=False))


def test_teacher_forcing_is_causal_in_the_text():
    # output step i sees text[:, :i + 1]; changing column 3 leaves steps 0-2 as they were
    net = small_model("None-VGG-None-Attn", seed=4)
    text = torch.tensor([[0, 2, 3, 4, 5, 1], [0, 6, 6, 2, 1, 0]])
    changed = text.clone()
    changed[:, 3] = torch.tensor([6, 5])
    with torch.no_grad():
        a, b = net(images(), text), net(images(), changed)
    assert torch.equal(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_teacher_forcing_needs_enough_text_columns():
    net = small_model("None-VGG-None-Attn")
    with pytest.raises(ValueError, match="batch_max_length \\+ 1 = 6 columns"):
        net(images(), torch.zeros(2, 4, dtype=torch.long), is_train=True)


# --------------------------------------------------------------------------- TPS geometry


def test_untrained_tps_is_the_identity_mapping_of_pixel_centres():
    # fc2 starts with zero weight, so C' = its bias = C and the spline is the identity; the grid
    # then holds the pixel centres x_j = (2j + 1 - W) / W, which grid_sample (align_corners=True)
    # reads at pixel position u_j = (x_j + 1) / 2 * (W - 1). Bilinear sampling is exact on a
    # linear ramp, so the output is the ramp evaluated at u_j (and v_i) -- within half a pixel of the input.
    net = small_model("TPS-VGG-None-CTC", seed=5)
    height, width = SMALL["imgH"], SMALL["imgW"]
    with torch.no_grad():
        torch.testing.assert_close(net.Transformation.LocalizationNetwork(images()),
                                   fiducial_points(SMALL["num_fiducial"]).float().expand(2, -1, -1))
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    slope_x, slope_y, offset = 0.02, -0.03, 0.1
    ramp = (slope_x * cols + slope_y * rows + offset).expand(1, 1, height, width)
    with torch.no_grad():
        out = net.Transformation(ramp)
    u = (2 * cols + 1) * (width - 1) / (2 * width)
    v = (2 * rows + 1) * (height - 1) / (2 * height)
    torch.testing.assert_close(out[0, 0], slope_x * u + slope_y * v + offset, rtol=0, atol=1e-5)
    assert (out - ramp).abs().max() <= 0.5 * (abs(slope_x) + abs(slope_y)) + 1e-5


def test_grid_generator_reproduces_affine_maps_exactly():
    # a thin-plate spline through points moved by an affine map is that affine map everywhere
    generator = GridGenerator(num_fiducial=10, out_size=(8, 12))
    C = fiducial_points(10).float()
    A = torch.tensor([[0.8, 0.2], [-0.1, 0.6]])
    t = torch.tensor([0.05, -0.1])
    grid = generator((C @ A.T + t).unsqueeze(0))
    xs = (torch.arange(12) * 2 + 1 - 12) / 12
    ys = (torch.arange(8) * 2 + 1 - 8) / 8
    centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=2)  # 8 x 12 x 2, (x, y)
    torch.testing.assert_close(grid[0], centres @ A.T + t, rtol=0, atol=1e-5)


def test_grid_generator_passes_through_moved_fiducial_points():
    # the spline interpolates: lifting C_k as [1, C_k, U(|C_k - C_j|)] (U(r) = r^2 log r, U(0) = 0)
    # and applying the coefficients solved from C' gives back C'_k
    generator = GridGenerator(num_fiducial=6, out_size=(4, 4))
    C = fiducial_points(6)
    moved = C + 0.1 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coefficients = generator.inv_delta_C.double()[:, :6] @ moved
    r = (C[:, None] - C[None]).norm(dim=2)
    kernel = torch.where(r > 0, r.square() * torch.log(r.clamp_min(1e-12)), torch.zeros_like(r))
    lifted = torch.cat([torch.ones(6, 1, dtype=torch.float64), C, kernel], dim=1)
    torch.testing.assert_close(lifted @ coefficients, moved, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- memory format, precision, device


@pytest.mark.parametrize("stages", ["TPS-ResNet-BiLSTM-Attn", "None-RCNN-None-CTC", "None-VGG-BiLSTM-CTC"])
def test_channels_last_and_bf16_autocast_match_fp32(stages):
    net = small_model(stages, seed=6)
    x = images()
    reference = predictions(net, x)
    net = net.to(memory_format=torch.channels_last)
    channels_last = predictions(net, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net(x.contiguous(memory_format=torch.channels_last), None, is_train=False)
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - reference).abs().max() < 0.05


def test_training_step_under_autocast_reaches_every_parameter():
    net = small_model("TPS-RCNN-BiLSTM-Attn", seed=7).train()
    initialize_weights(net)
    text = torch.tensor([[0, 2, 3, 1, 0, 0], [0, 4, 1, 0, 0, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(images().contiguous(memory_format=torch.channels_last), text)
    logits.float().logsumexp(2).sum().backward()
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


def test_buffers_and_state_follow_the_model_dtype():
    # TPS buffers are registered, and the decoder's zero state is made like the parameters:
    # a double model runs on double input (a hard-coded FloatTensor would fail here)
    net = small_model("TPS-VGG-BiLSTM-Attn").double()
    assert net.Transformation.GridGenerator.P_hat.dtype == torch.float64
    out = predictions(net, images().double())
    assert out.dtype == torch.float64


def test_no_hard_coded_cuda():
    sources = [ROOT / "model.py", *sorted((ROOT / "modules").glob("*.py"))]
    offenders = [f"{path.name}:{number}" for path in sources
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\.cuda\(|['\"]cuda|torch\.cuda|FloatTensor|LongTensor", line)]
    assert offenders == []


# --------------------------------------------------------------------------- MC dropout, initialisation


def test_mc_dropout_is_off_by_default_and_stochastic_when_on():
    net = small_model("None-VGG-BiLSTM-CTC", seed=8)
    keys = list(net.state_dict())
    assert net.mc_dropout_p == 0.0
    first = predictions(net, images())
    assert torch.equal(first, predictions(net, images()))
    net.mc_dropout_p = 0.5
    assert list(net.state_dict()) == keys
    torch.manual_seed(0)
    one, two = predictions(net, images()), predictions(net, images())  # eval mode, still stochastic
    assert not torch.equal(one, two)
    net.mc_dropout_p = 0.0
    assert torch.equal(predictions(net, images()), first)


def test_mc_dropout_zeroes_sequence_features_before_the_head():
    # CTC without a sequence stage: the head is linear, so a dropped feature column contributes
    # only the bias; with p = 1 every column is dropped and every logit equals the bias
    net = small_model("None-VGG-None-CTC", seed=9)
    net.mc_dropout_p = 1.0
    out = predictions(net, images())
    torch.testing.assert_close(out, net.Prediction.bias.detach().expand_as(out))


def test_initialize_weights_keeps_the_tps_start_and_resets_the_rest():
    net = small_model("TPS-ResNet-BiLSTM-Attn", seed=10)
    initialize_weights(net)
    fc2 = net.Transformation.LocalizationNetwork.localization_fc2
    assert torch.count_nonzero(fc2.weight) == 0
    torch.testing.assert_close(fc2.bias.view(-1, 2), fiducial_points(SMALL["num_fiducial"]).float())
    state = dict(net.named_parameters())
    assert torch.count_nonzero(state["Prediction.attention_cell.h2h.bias"]) == 0
    assert torch.count_nonzero(state["SequenceModeling.0.rnn.bias_ih_l0"]) == 0
    assert torch.all(state["FeatureExtraction.ConvNet.bn0_1.weight"] == 1)
    # Kaiming normal (fan_in, gain sqrt 2): std = sqrt(2 / (in_channels * 3 * 3))
    weight = state["FeatureExtraction.ConvNet.layer3.0.conv1.weight"]
    expected = (2 / (weight.shape[1] * 9)) ** 0.5
    assert abs(weight.std().item() / expected - 1) < 0.05


def test_module_prefix_constant_is_dataparallel_layout():
    wrapped = nn.DataParallel(small_model("None-VGG-None-CTC"))
    assert all(key.startswith(model_lib.PREFIX) for key in wrapped.state_dict())
    assert list(state_dict_for_saving(wrapped)) == list(wrapped.state_dict())


def test_a_last_pth_is_read_for_its_weights(tmp_path):
    """data_sampling.py, test.py and demo.py take --saved_model .../last.pth (when validation stayed
    flat, best_accuracy.pth is the first iteration's model): its `model` entry is loaded, though the
    file also holds numpy's generator state, which a plain weights-only load refuses."""
    import numpy as np

    trained = small_model("None-VGG-None-CTC", seed=3)
    path = tmp_path / "last.pth"
    torch.save({"model": state_dict_for_saving(trained), "optimizer": {"state": {}, "param_groups": []},
                "iteration": 20, "opt": {"num_iter": 20}, "loss_avg": np.float64(0.5),
                "rng": {"numpy": np.random.RandomState(0).get_state(), "torch": torch.get_rng_state()}}, path)
    target = small_model("None-VGG-None-CTC", seed=4)
    report = load_weights(target, path)
    assert report.complete and len(report.loaded) == len(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
