"""utils: converters, decoding and confidence, simulated annotator noise, logging and device
helpers (temperature scaling and the calibration metrics: test_calibration.py; atomic writes and
temporaries: test_atomic_io.py). Expected values are worked out by hand in comments."""
import errno
import io
import itertools
import math
import random

import lmdb
import pytest
import torch

from safe_files import atomic_io
import utils
from utils import UserError

torch.set_num_threads(1)


def logits_from_probs(rows):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


def peaked(num_class, winner, p):
    """A distribution with `p` on `winner` and the rest spread evenly."""
    row = [(1.0 - p) / (num_class - 1)] * num_class
    row[winner] = p
    return row


# ------------------------------------------------------------------------------ converters

def test_attn_encode_layout():
    converter = utils.AttnLabelConverter("abc")  # [GO]=0 [s]=1 a=2 b=3 c=4
    text, lengths = converter.encode(["ab", "", "cab"], batch_max_length=4)
    assert text.dtype == torch.long and text.shape == (3, 6)
    assert text.tolist() == [[0, 2, 3, 1, 0, 0],
                             [0, 1, 0, 0, 0, 0],
                             [0, 4, 2, 3, 1, 0]]
    assert lengths.tolist() == [3, 1, 4]
    assert converter.character[:2] == ["[GO]", "[s]"] and converter.dict["c"] == 4


def test_attn_encode_cuts_long_labels_and_their_length():
    converter = utils.AttnLabelConverter("abc")
    text, lengths = converter.encode(["abcabc"], batch_max_length=4)
    assert text.tolist() == [[0, 2, 3, 4, 2, 1]]
    assert lengths.tolist() == [5]


def test_attn_round_trip():
    charset = "0123456789abcdefghijklmnopqrstuvwxyz"
    converter = utils.AttnLabelConverter(charset)
    rng = random.Random(0)
    texts = ["".join(rng.choice(charset) for _ in range(rng.randint(0, 25))) for _ in range(50)]
    text, lengths = converter.encode(texts, batch_max_length=25)
    decoded = converter.decode(text[:, 1:], lengths)
    assert [converter.strip_eos(d) for d in decoded] == texts
    assert decoded[0].startswith(texts[0] + "[s]")  # as the original: [s] and the padding follow


def test_ctc_encode_layout_and_round_trip():
    converter = utils.CTCLabelConverter("ab")  # blank=0 a=1 b=2
    text, lengths = converter.encode(["ab", "", "abba"], batch_max_length=4)
    assert text.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0], [1, 2, 2, 1]]
    assert lengths.tolist() == [2, 0, 4]
    assert converter.character == ["[CTCblank]", "a", "b"]
    # Decoding collapses repeats: the label path "abba" reads "aba".
    assert converter.decode(text, lengths) == ["ab", "", "aba"]


def test_ctc_decode_round_trips_an_alignment_with_blanks_between_repeats():
    charset = "abcdefgh"
    converter = utils.CTCLabelConverter(charset)
    rng = random.Random(1)
    texts = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 8))) for _ in range(40)]
    # The alignment c1 - c2 - c3 ... (a blank after every character) decodes to the text itself.
    rows = [[converter.dict[ch] for ch in t] for t in texts]
    aligned = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, row in enumerate(rows):
        for j, index in enumerate(row):
            aligned[i, 2 * j] = index
    assert converter.decode(aligned, torch.full((len(texts),), 16)) == texts
    # Only the first `length` frames count.
    assert converter.decode(torch.tensor([[1, 0, 2, 0, 3]]), torch.tensor([3])) == ["ab"]


@pytest.mark.parametrize("cls", [utils.AttnLabelConverter, utils.CTCLabelConverter])
def test_out_of_charset_character_is_a_user_error(cls):
    converter = cls("abc")
    with pytest.raises(UserError) as err:
        converter.encode(["ab", "aXb"])
    message = str(err.value)
    assert "'X'" in message and "--character" in message and "--sensitive" in message
    assert "\n" not in message


def test_attn_special_tokens_are_not_characters():
    with pytest.raises(UserError):
        utils.AttnLabelConverter("abc").encode(["[s]"])


def test_make_converter_by_name():
    assert isinstance(utils.make_converter("CTC", "ab"), utils.CTCLabelConverter)
    assert isinstance(utils.make_converter("Attn", "ab"), utils.AttnLabelConverter)
    with pytest.raises(UserError, match="--Prediction"):
        utils.make_converter("Transformer", "ab")


# ------------------------------------------------------------------------------ decoding

def test_decode_predictions_attn_stops_at_eos():
    converter = utils.AttnLabelConverter("abc")  # [GO]=0 [s]=1 a=2 b=3 c=4
    c = 5
    logits = logits_from_probs([
        [peaked(c, 2, 0.9), peaked(c, 3, 0.8), peaked(c, 1, 0.7), peaked(c, 4, 0.6)],  # a b [s] c
        [peaked(c, 4, 0.5), peaked(c, 4, 0.6), peaked(c, 2, 0.7), peaked(c, 3, 0.8)],  # c c a b, no [s]
    ])
    texts, word_conf, char_conf = utils.decode_predictions(logits, converter)
    assert texts == ["ab", "ccab"]
    # Row 0: 0.9 * 0.8 * 0.7 (up to and including [s]) = 0.504; row 1: 0.5*0.6*0.7*0.8 = 0.168.
    assert word_conf.dtype == torch.float32
    assert word_conf.tolist() == pytest.approx([0.504, 0.168], abs=1e-6)
    assert char_conf[0].tolist() == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)
    assert char_conf[1].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8], abs=1e-6)
    mask = utils.token_mask(logits, converter)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_decode_predictions_attn_never_prints_go():
    converter = utils.AttnLabelConverter("abc")  # [GO]=0 [s]=1 a=2 b=3 c=4
    c = 5
    logits = logits_from_probs([[peaked(c, 2, 0.9), peaked(c, 0, 0.6), peaked(c, 3, 0.8), peaked(c, 1, 0.5)]])
    texts, word_conf, char_conf = utils.decode_predictions(logits, converter)
    assert texts == ["ab"]  # a [GO] b [s]: the [GO] step adds no text
    # 0.9 * 0.6 * 0.8 * 0.5 = 0.216: the [GO] step still counts in the confidence
    assert word_conf.tolist() == pytest.approx([0.216], abs=1e-6)
    assert char_conf[0].tolist() == pytest.approx([0.9, 0.6, 0.8, 0.5], abs=1e-6)


def brute_force_ctc_probability(probs, text_indices):
    """Sum over every path whose collapse is the text of the product of its frame probabilities."""
    steps, num_class = probs.shape
    total = 0.0
    for path in itertools.product(range(num_class), repeat=steps):
        collapsed = [s for t, s in enumerate(path) if s != 0 and (t == 0 or path[t - 1] != s)]
        if collapsed == text_indices:
            total += math.prod(probs[t, s].item() for t, s in enumerate(path))
    return total


def test_decode_predictions_ctc_collapses_and_scores_the_text():
    converter = utils.CTCLabelConverter("ab")  # blank=0 a=1 b=2
    rows = [
        [[0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]],  # a a b - -> "ab"
        [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]],  # a - a - -> "aa"
        [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]],  # all blank -> ""
    ]
    probs = torch.tensor(rows, dtype=torch.float64)
    texts, word_conf, char_conf = utils.decode_predictions(probs.log().float(), converter)
    assert texts == ["ab", "aa", ""]
    expected = [brute_force_ctc_probability(probs[i], [converter.dict[ch] for ch in texts[i]]) for i in range(3)]
    assert word_conf.tolist() == pytest.approx(expected, rel=1e-5)
    # char_conf: the max probability of the frame that emitted each character.
    assert char_conf[0].tolist() == pytest.approx([0.8, 0.7], abs=1e-6)
    assert char_conf[1].tolist() == pytest.approx([0.7, 0.7], abs=1e-6)
    assert char_conf[2].numel() == 0
    assert utils.token_mask(probs.log(), converter).all()


def test_decode_predictions_returns_fp32_for_half_precision_input():
    converter = utils.AttnLabelConverter("abc")
    logits = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    texts, conf, char_conf = utils.decode_predictions(logits.bfloat16(), converter)
    assert conf.dtype == torch.float32 and all(c.dtype == torch.float32 for c in char_conf)
    assert len(texts) == 3 and ((conf > 0) & (conf <= 1)).all()


def test_margin_and_entropy_over_counted_steps():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # margins 0.5 and 0.0 counted -> 0.25; the third step is not counted.
    assert utils.mean_margin(probs, mask).tolist() == pytest.approx([0.25])
    # entropies: -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.801819, ln 2 = 0.693147 -> mean 0.747483
    assert utils.mean_entropy(probs, mask).tolist() == pytest.approx([0.747483], abs=1e-5)
    assert utils.mean_margin(probs, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [0.0]


# ------------------------------------------------------------------------------ logging

def test_averager_is_weighted():
    avg = utils.Averager()
    assert avg.val() == 0.0
    avg.add(2.0)
    avg.add(torch.tensor(4.0), n=3)
    assert avg.val() == pytest.approx((2.0 + 12.0) / 4)
    avg.add(torch.tensor([1.0, 3.0]))
    assert avg.val() == pytest.approx((14.0 + 4.0) / 6)
    avg.reset()
    assert avg.val() == 0.0


def test_logger_tees_to_file_and_stdout(tmp_path, capsys):
    path = tmp_path / "logs" / "log.txt"
    with utils.Logger(str(path)) as log:
        log.log("first")
        log("second", "third")
    assert path.read_text(encoding="utf-8") == "first\nsecond\nthird\n"
    assert capsys.readouterr().out == "first\nsecond\nthird\n"


def test_format_metrics_one_line():
    assert utils.format_metrics({"acc": 0.91234, "n": 10, "ece": float("nan")}) == "acc=0.9123 n=10 ece=nan"


# ------------------------------------------------------------------------------ devices and runs

def test_select_device():
    assert utils.select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert utils.select_device("auto").type == expected
    for bad in ("gpu0", "cuda:x", "cuda:99"):
        with pytest.raises(UserError, match="--device"):
            utils.select_device(bad)


def test_autocast_context():
    a = torch.randn(4, 4)
    with utils.autocast_context(torch.device("cpu"), enabled=True):
        assert (a @ a).dtype == torch.bfloat16
    with utils.autocast_context(torch.device("cpu"), enabled=False):
        assert (a @ a).dtype == torch.float32


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert utils.init_distributed() == (0, 1, 0, False)
    assert utils.is_main_process()
    assert utils.all_gather_object({"a": 1}) == [{"a": 1}]
    assert utils.broadcast_flag(True) is True
    utils.barrier()


def test_set_seed_repeats_draws():
    utils.set_seed(5)
    first = (random.random(), torch.rand(3).tolist())
    utils.set_seed(5)
    assert (random.random(), torch.rand(3).tolist()) == first


# ------------------------------------------------------------------------------ errors of the surroundings

@pytest.mark.parametrize("err, line", [
    (OSError(errno.EROFS, "Read-only file system", "/data/out/results.json"),
     "error: /data/out/results.json: read-only file system; choose a folder on a writable disk"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
     "error: /data/out: permission denied; fix its permissions or choose a path you may write to"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/last.pth"),
     "error: /data/out/last.pth: no space left on device; free some space or choose a folder on another disk"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/q"),
     "error: /data/q: disk quota exceeded; free some space or choose a folder on another disk"),
    (lmdb.DiskError("mdb_txn_commit: No space left on device"),
     "error: LMDB error: mdb_txn_commit: No space left on device; if a disk is full, free some space; if an "
     "LMDB is damaged, rebuild it with create_lmdb_dataset.py"),
])
def test_wrapper_turns_a_full_or_read_only_disk_into_one_line(err, line, capsys):
    def main():
        raise err

    with pytest.raises(SystemExit) as exit_info:
        utils.exit_on_user_error(main)()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("err", [FileNotFoundError(errno.ENOENT, "No such file", "x"), ValueError("a bug")])
def test_wrapper_keeps_other_errors_for_their_traceback(err):
    def main():
        raise err

    with pytest.raises(type(err)):
        utils.exit_on_user_error(main)()


def test_appending_logs_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    monkeypatch.setattr(utils, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    for write, path in ((lambda p: atomic_io.append_text(p, "line\n"), tmp_path / "metrics.jsonl"),
                        (lambda p: utils.Logger(str(p), echo=False).log("line"), tmp_path / "log_train.txt")):
        with pytest.raises(OSError) as info:
            write(path)
        assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))


# ------------------------------------------------------------------------------ mixed precision

def test_amp_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch, capsys):
    monkeypatch.delenv("ROBUST_AL_CPU_AMP", raising=False)
    avx2_only = {"fpu", "sse2", "avx2", "fma"}
    assert utils.effective_amp(True, "cpu", flags=avx2_only) is False
    err = capsys.readouterr().err
    assert err.startswith("warning: --amp:") and "fp32" in err and err.count("\n") == 1
    assert utils.effective_amp(True, "cpu", flags=avx2_only | {"avx512_bf16"}) is True
    assert utils.effective_amp(True, "cpu", flags={"fp", "asimd", "bf16"}) is True  # aarch64
    assert utils.effective_amp(True, "cpu", flags=None) is True  # flags unknown: as asked
    assert utils.effective_amp(False, "cpu", flags=avx2_only) is False
    assert utils.effective_amp(True, "cuda", flags=avx2_only) is True
    monkeypatch.setenv("ROBUST_AL_CPU_AMP", "1")
    assert utils.effective_amp(True, "cpu", flags=avx2_only) is True
    assert capsys.readouterr().err == ""  # only the fall-back speaks
