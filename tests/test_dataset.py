"""dataset.py: LMDB reading, filtering, selection, splits, balanced batches, collation, writing;
and the synthetic generator's determinism."""
import io
import os
import stat

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from annotators import annotator_noise
from safe_files import atomic_io
import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
from tools import make_synth_lmdb as synth
from utils import UserError

torch.set_num_threads(1)


def png(value=128, size=(12, 8), mode="L"):
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def write_set(path, labels, origins=None, meta=None, images=None):
    images = images or [png(10 * k % 256) for k in range(len(labels))]
    origins = origins or [None] * len(labels)
    return lmdb_writing.write_lmdb(str(path), zip(images, labels, origins), meta=meta)


def read_raw(path):
    with lmdb_format.shared_env(str(path)).begin() as txn:
        return dict(txn.cursor())


def ids_of(name_or_path, count):
    return [(name_or_path, k) for k in range(1, count + 1)]


# ---------------------------------------------------------------- LmdbDataset: filtering and case

MIXED_LABELS = ["Hello", "WORLD42", "a" * 30, "don't", "Mixed Case", "x"]


def test_default_options_lowercase_and_filter(tmp_path, make_opt):
    write_set(tmp_path / "set", MIXED_LABELS)
    ds = dataset.LmdbDataset(str(tmp_path / "set"), make_opt())
    assert [ds[i][1] for i in range(len(ds))] == ["hello", "world42", "x"]
    assert [ds[i][2] for i in range(len(ds))] == [(".", 1), (".", 2), (".", 6)]
    assert list(ds.identities) == [(".", 1), (".", 2), (".", 6)]
    assert ds.num_total == 6
    assert dict(ds.filter_counts) == {"too long": 1, "out of charset": 2}


def test_sensitive_keeps_case_and_punctuation(tmp_path, make_opt):
    write_set(tmp_path / "set", MIXED_LABELS)
    ds = dataset.LmdbDataset(str(tmp_path / "set"), make_opt(sensitive=True))
    # 94 printable characters: the apostrophe is in, the space is not.
    assert [ds[i][1] for i in range(len(ds))] == ["Hello", "WORLD42", "don't", "x"]


def test_filtering_off_keeps_all_and_strips_unknown_characters(tmp_path, make_opt):
    write_set(tmp_path / "set", MIXED_LABELS)
    ds = dataset.LmdbDataset(str(tmp_path / "set"), make_opt(data_filtering_off=True))
    assert [ds[i][1] for i in range(len(ds))] == ["hello", "world42", "a" * 30, "dont", "mixedcase", "x"]


def test_character_file_with_capitals_is_not_lowercased(tmp_path, make_opt):
    charset = tmp_path / "chars.txt"
    charset.write_text("ABCabc\n", encoding="utf-8")
    write_set(tmp_path / "set", ["Abc", "ABC", "abD", "cab"])
    ds = dataset.LmdbDataset(str(tmp_path / "set"), make_opt(character_file=str(charset)))
    assert [ds[i][1] for i in range(len(ds))] == ["Abc", "ABC", "cab"]


def test_rgb_option_sets_image_mode(tmp_path, make_opt):
    write_set(tmp_path / "set", ["ab"], images=[png(value=(200, 10, 10), mode="RGB")])
    assert dataset.LmdbDataset(str(tmp_path / "set"), make_opt(rgb=True))[0][0].mode == "RGB"
    grey = dataset.LmdbDataset(str(tmp_path / "set"), make_opt())[0][0]
    assert grey.mode == "L"
    # ITU-R 601 luma of (200, 10, 10): 0.299*200 + 0.587*10 + 0.114*10 = 66.81
    assert abs(int(np.asarray(grey)[0, 0]) - 67) <= 1


# ---------------------------------------------------------------- corrupt images

def bad_set(root):
    good = png(60)
    truncated = good[: len(good) // 2]
    images = [good, b"not an image at all", good, truncated, good]
    write_set(root / "bad", ["aa", "bb", "cc", "dd", "ee"], images=images)


def test_corrupt_image_is_none_and_dropped_by_collate(tmp_path, make_opt):
    bad_set(tmp_path)
    ds = dataset.LmdbDataset(str(tmp_path / "bad"), make_opt())
    items = [ds[i] for i in range(len(ds))]
    assert [item[0] is None for item in items] == [False, True, False, True, False]
    assert ds.num_undecodable == 2
    images, labels, ids = dataset.AlignCollate()(items)
    assert labels == ["aa", "cc", "ee"]
    assert ids == [(".", 1), (".", 3), (".", 5)]
    assert images.shape == (3, 1, 32, 100)


def test_balanced_loader_counts_skipped_images(tmp_path, make_opt):
    bad_set(tmp_path)
    opt = make_opt(train_data=str(tmp_path), select_data="bad", batch_ratio="1", batch_size=5)
    loader = dataset.Batch_Balanced_Dataset(opt)
    images, labels, ids = loader.get_batch()
    assert sorted(labels) == ["aa", "cc", "ee"]
    assert images.shape[0] == 3
    assert loader.skipped_images == 2
    loader.get_batch()
    assert loader.skipped_images == 4
    assert loader.skipped_report() == "undecodable images skipped: 4 (bad 4)"


# ---------------------------------------------------------------- selection by name

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    for rel in ["training/MJ/MJ_train", "training/MJ/MJ_valid", "training/ST", "NIPS2014", "NIPS2014_extra",
                "natural/set10", "natural/set2"]:
        write_set(root / rel, ["ab", "cd"])
    write_set(root / ".half_written.tmp", ["zz"])  # hidden: a write in progress
    return root


def test_name_selects_by_path_component(tree, make_opt):
    opt = make_opt()
    ds, log = dataset.hierarchical_dataset(str(tree), opt, select_data=["MJ"])
    assert list(ds.identities) == ids_of("training/MJ/MJ_train", 2) + ids_of("training/MJ/MJ_valid", 2)
    assert "/training/MJ/MJ_train" in log and "/training/ST" not in log
    ds, _ = dataset.hierarchical_dataset(str(tree), opt, select_data="NIPS2014")
    assert list(ds.identities) == ids_of("NIPS2014", 2)


def test_everything_in_natural_order(tree, make_opt):
    ds, _ = dataset.hierarchical_dataset(str(tree), make_opt())
    leaves = [identity[0] for identity in ds.identities][::2]
    # natsort order: capitals first, set2 before set10
    assert leaves == ["NIPS2014", "NIPS2014_extra", "natural/set2", "natural/set10", "training/MJ/MJ_train",
                      "training/MJ/MJ_valid", "training/ST"]
    assert len(ds) == 14
    assert ds[13][1:] == ("cd", ("training/ST", 2))


def test_root_that_is_itself_an_lmdb(tree, make_opt):
    ds, _ = dataset.hierarchical_dataset(str(tree / "training" / "ST"), make_opt(), select_data="ST")
    assert list(ds.identities) == ids_of(".", 2)


def test_unknown_name_lists_existing(tree, make_opt):
    with pytest.raises(UserError) as err:
        dataset.hierarchical_dataset(str(tree), make_opt(), select_data=["NIPS"])
    message = str(err.value)
    assert "NIPS" in message and "NIPS2014_extra" in message and "training/MJ/MJ_train" in message
    assert "\n" not in message


def test_missing_or_empty_root(tmp_path, make_opt):
    with pytest.raises(UserError, match="--train_data .*no such folder"):
        dataset.hierarchical_dataset(str(tmp_path / "nope"), make_opt(), flag="--train_data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no LMDB"):
        dataset.hierarchical_dataset(str(tmp_path / "empty"), make_opt())


# ---------------------------------------------------------------- splits, exclusion, query sets

def test_labelled_unlabelled_split(tiny_data, make_opt):
    opt = make_opt(total_data_usage_ratio="0.25")
    names = ["CVPR2016", "NIPS2014"]
    full, _ = dataset.hierarchical_dataset(tiny_data.train, opt, select_data=names)
    labelled, _ = dataset.hierarchical_dataset(tiny_data.train, opt, select_data=names, split="labelled")
    unlabelled, _ = dataset.hierarchical_dataset(tiny_data.train, opt, select_data=names, split="unlabelled")
    everything = list(full.identities)
    k = int(len(everything) * 0.25)
    assert len(labelled) == k and len(unlabelled) == len(everything) - k
    assert list(labelled.identities) == everything[:k]
    assert list(unlabelled.identities) == everything[k:]
    assert labelled[k - 1][2] == everything[k - 1]
    assert unlabelled[0][2] == everything[k]


def test_exclude_drops_identities_without_moving_the_split(tiny_data, make_opt):
    opt = make_opt(total_data_usage_ratio="0.5")
    pool, _ = dataset.hierarchical_dataset(tiny_data.train, opt, select_data="/", split="unlabelled")
    before = list(pool.identities)
    dropped = set(before[1:6])
    pool2, log = dataset.hierarchical_dataset(tiny_data.train, opt, select_data="/", split="unlabelled",
                                              exclude=dropped)
    assert list(pool2.identities) == [i for i in before if i not in dropped]
    assert "excluded 5" in log
    labelled, _ = dataset.hierarchical_dataset(tiny_data.train, opt, split="labelled", exclude=dropped)
    labelled_plain, _ = dataset.hierarchical_dataset(tiny_data.train, opt, split="labelled")
    assert list(labelled.identities) == list(labelled_plain.identities)


@pytest.fixture
def pool_with_query(tmp_path):
    """pool/base: 40 samples; pool/queried: a query set of base samples 31..40."""
    root = tmp_path / "al"
    labels = [f"w{k}" for k in range(1, 41)]
    write_set(root / "pool" / "base", labels)
    origins = [("pool/base", k) for k in range(31, 41)]
    write_set(root / "pool" / "queried", labels[30:], origins=origins, meta={"strategy": "test"})
    return root


def test_query_set_used_in_full_and_absent_from_pool(pool_with_query, make_opt):
    root = str(pool_with_query)
    opt = make_opt(total_data_usage_ratio="0.5")
    assert set_records.is_query_set(os.path.join(root, "pool", "queried"))
    assert not set_records.is_query_set(os.path.join(root, "pool", "base"))
    assert set_records.read_query_meta(os.path.join(root, "pool", "queried")) == {"strategy": "test"}
    labelled, _ = dataset.hierarchical_dataset(root, opt, select_data="pool", split="labelled")
    # int(40 * 0.5) = 20 base samples, plus the whole query set of 10
    assert list(labelled.identities) == ids_of("pool/base", 20) + ids_of("pool/queried", 10)
    origins = set_records.read_query_origins(root)
    assert origins == {("pool/base", k) for k in range(31, 41)}
    pool, _ = dataset.hierarchical_dataset(root, opt, select_data="pool", split="unlabelled", exclude=origins)
    assert list(pool.identities) == [("pool/base", k) for k in range(21, 31)]
    assert set_records.read_query_origins(os.path.join(root, "pool", "base")) == set()


# ---------------------------------------------------------------- label noise plumbing

def noisy_opt(make_opt, root, scope, **extra):
    return make_opt(train_data=root, select_data="pool", batch_ratio="1", batch_size=4,
                    total_data_usage_ratio="0.5", noise_ratio=0.3, noise_scope=scope, manualSeed=99, **extra)


def given_labels(ds):
    return {ds[i][2]: ds[i][1] for i in range(len(ds))}


def clean_label(identity):
    relpath, index = identity
    return f"w{index + 30 if relpath == 'pool/queried' else index}"


def test_noise_only_on_queried_samples(pool_with_query, make_opt):
    opt = noisy_opt(make_opt, str(pool_with_query), "queried")
    log = io.StringIO()
    loader = dataset.Batch_Balanced_Dataset(opt, log=log)
    # 10 queried samples at 0.3: exactly 3 corrupted; the 20 labelled base samples untouched
    assert loader.num_corrupted == 3
    given = given_labels(loader.datasets["pool"])
    wrong = {identity for identity, label in given.items() if label != clean_label(identity)}
    assert len(wrong) == 3 and all(identity[0] == "pool/queried" for identity in wrong)
    # the same samples, keyed by their origin, as annotator_noise picks them
    clean = [(("pool/base", k), f"w{k}") for k in range(31, 41)]
    chosen = annotator_noise.noisy_labels(clean, 0.3, opt.character, 99, max_length=opt.batch_max_length)
    assert {("pool/queried", origin[1] - 30) for origin in chosen} == wrong
    assert "3 corrupted labels" in log.getvalue() and "model substitute" in log.getvalue()


@pytest.mark.parametrize("model", list(annotator_noise.NOISE_MODELS))
def test_noise_model_reaches_the_dataset_and_its_records(pool_with_query, make_opt, model):
    opt = noisy_opt(make_opt, str(pool_with_query), "all", noise_model=model)
    loader = dataset.Batch_Balanced_Dataset(opt)
    given = given_labels(loader.datasets["pool"])
    records = loader.noise_records()
    assert len(records) == loader.num_corrupted == 9
    # each record: where the sample is, where it came from, and the truth beside the given label
    for record in records:
        identity = (record["relpath"], record["index"])
        assert record["clean_label"] == clean_label(identity) != record["noisy_label"] == given[identity]
        if record["relpath"] == "pool/queried":
            assert (record["origin_relpath"], record["origin_index"]) == ("pool/base", record["index"] + 30)
        else:
            assert record["origin_relpath"] is None and record["origin_index"] is None
    # the same wrong labels and kinds as annotator_noise gives for those samples, keyed by origin
    queried = [(("pool/base", k), f"w{k}") for k in range(31, 41)]
    expected = annotator_noise.noisy_labels(queried, 0.3, opt.character, 99, max_length=opt.batch_max_length,
                                            model=model)
    assert {(r["origin_index"], r["noisy_label"], r["kind"]) for r in records if r["origin_relpath"]} == {
        (index, c.label, c.kind) for (_, index), c in expected.items()}
    leaf = next(leaf for leaf in loader.datasets["pool"].leaves if leaf.is_query)
    assert set(leaf.noise_kinds) == set(leaf.noisy_labels) and len(leaf.noise_kinds) == 3


def test_unknown_noise_model(pool_with_query, make_opt):
    with pytest.raises(UserError, match="--noise_model typo: unknown; choose one of substitute, confusable"):
        dataset.Batch_Balanced_Dataset(noisy_opt(make_opt, str(pool_with_query), "queried", noise_model="typo"))


def test_noise_on_all_samples(pool_with_query, make_opt):
    loader = dataset.Batch_Balanced_Dataset(noisy_opt(make_opt, str(pool_with_query), "all"))
    # each dataset it touches: round(0.3 x 20) = 6 of the labelled base samples, round(0.3 x 10) = 3 queried
    assert loader.num_corrupted == 9


def test_unknown_noise_scope(pool_with_query, make_opt):
    with pytest.raises(UserError, match="--noise_scope"):
        dataset.Batch_Balanced_Dataset(noisy_opt(make_opt, str(pool_with_query), "some"))


# ---------------------------------------------------------------- balanced batches

def test_batch_shares_over_many_batches(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, batch_ratio="0.7-0.3", batch_size=10)
    log = io.StringIO()
    loader = dataset.Batch_Balanced_Dataset(opt, log=log)
    assert loader.batch_sizes == {"CVPR2016": 7, "NIPS2014": 3}
    kept = loader.num_samples["CVPR2016"]
    per_epoch = kept // 7
    seen = []
    for _ in range(per_epoch + 5):  # past one epoch of CVPR2016: the loader restarts
        images, labels, ids = loader.get_batch()
        assert images.shape == (10, 1, 32, 100)
        assert len(labels) == 10
        assert [i[0] for i in ids] == ["CVPR2016"] * 7 + ["NIPS2014"] * 3
        seen.extend(ids[:7])
    first_epoch = seen[: per_epoch * 7]
    assert len(set(first_epoch)) == per_epoch * 7  # no repeat within an epoch
    assert "Total_batch_size: 7+3 = 10" in log.getvalue()


def test_tiny_share_still_gets_one_sample(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, batch_ratio="0.99-0.01", batch_size=10)
    loader = dataset.Batch_Balanced_Dataset(opt)
    assert loader.batch_sizes == {"CVPR2016": 10, "NIPS2014": 1}


def test_ranks_see_disjoint_shards(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, batch_size=4)
    shards = [dataset.Batch_Balanced_Dataset(opt, rank=r, world_size=2) for r in (0, 1)]
    for k in range(2):
        parts = [set(s.data_loader_list[k].dataset.dataset.identities[i] for i in s.data_loader_list[k].dataset.indices)
                 for s in shards]
        assert not parts[0] & parts[1]
        assert len(parts[0] | parts[1]) == shards[0].num_samples[opt.select_data[k]]


def test_empty_labelled_part_is_a_user_error(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, total_data_usage_ratio="0.001")
    with pytest.raises(UserError, match="no labelled sample"):
        dataset.Batch_Balanced_Dataset(opt)


def test_dataset_smaller_than_its_batch_share_is_drawn_with_replacement(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, batch_size=1000, total_data_usage_ratio="0.1")
    loader = dataset.Batch_Balanced_Dataset(opt)
    assert "drawn with replacement" in loader.log_text
    images, labels, ids = loader.get_batch()
    assert images.shape[0] == 1000 and len(ids) == 1000
    for name in opt.select_data:
        drawn = {i for i in ids if i[0] == name}
        # only labelled samples, so at most the labelled count of distinct ones
        assert 0 < len(drawn) <= loader.num_samples[name] < 500


def test_loader_with_worker_processes(tiny_data, make_opt):
    opt = make_opt(train_data=tiny_data.train, select_data="NIPS2014", batch_ratio="1", batch_size=8, workers=1)
    loader = dataset.Batch_Balanced_Dataset(opt)
    for _ in range(3):
        images, labels, ids = loader.get_batch()
        assert images.shape == (8, 1, 32, 100) and len(set(ids)) == 8


# ---------------------------------------------------------------- collation

def test_collate_resize_values():
    items = [(Image.new("L", (20, 10), 51), "a", ("x", 1)), (Image.new("L", (300, 40), 255), "b", ("x", 2)),
             (None, "c", ("x", 3))]
    images, labels, ids = dataset.AlignCollate(32, 100)(items)
    assert images.shape == (2, 1, 32, 100) and images.dtype == torch.float32
    assert labels == ["a", "b"] and ids == [("x", 1), ("x", 2)]
    # uniform images stay uniform: 51 -> 51/127.5 - 1 = -0.6, white -> 1
    assert torch.allclose(images[0], torch.full((1, 32, 100), -0.6))
    assert torch.allclose(images[1], torch.ones(1, 32, 100))


def test_collate_pad_repeats_last_column():
    narrow = Image.new("L", (20, 10), 0)
    narrow.paste(255, (10, 0, 20, 10))  # left half black, right half white
    wide = Image.new("RGB", (400, 10), (0, 0, 0))
    images, _, _ = dataset.AlignCollate(32, 100, keep_ratio_with_pad=True)([(narrow, "a", 1)])
    # width ceil(32 * 20 / 10) = 64: columns 64..99 copy column 63 (white)
    assert images.shape == (1, 1, 32, 100)
    assert torch.allclose(images[0, :, :, 64:], torch.ones(1, 32, 36))
    assert torch.allclose(images[0, :, :, :20], -torch.ones(1, 32, 20))
    assert images.min() >= -1 and images.max() <= 1
    rgb, _, _ = dataset.AlignCollate(32, 100, keep_ratio_with_pad=True)([(wide, "b", 2), (wide, "c", 3)])
    assert rgb.shape == (2, 3, 32, 100) and torch.allclose(rgb, -torch.ones_like(rgb))


def test_collate_of_only_broken_items():
    images, labels, ids = dataset.AlignCollate(32, 100, channels=3)([(None, "a", 1)])
    assert images.shape == (0, 3, 32, 100) and labels == [] and ids == []


# ---------------------------------------------------------------- RawDataset

def test_raw_dataset_natural_order_and_skips(tmp_path, make_opt, capsys):
    for name in ["img10.png", "img2.png", "img1.png"]:
        Image.new("L", (30, 10), 200).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "notes.txt").write_text("not an image")
    raw = dataset.RawDataset(str(tmp_path), make_opt())
    assert [os.path.basename(p) for p in raw.paths] == ["img1.png", "img2.png", "img10.png"]
    assert [os.path.basename(p) for p, _ in raw.skipped] == ["broken.png"]
    assert "broken.png" in capsys.readouterr().out
    images, paths, again = dataset.AlignCollate()([raw[i] for i in range(len(raw))])
    assert images.shape == (3, 1, 32, 100) and paths == again == raw.paths


# ---------------------------------------------------------------- write_lmdb

def test_write_lmdb_layout_and_origins(tmp_path):
    count = lmdb_writing.write_lmdb(str(tmp_path / "q"), [(b"img1", "Ab", ("src", 7)), (b"img2", "c d", None)],
                                    meta={"ratio": 0.1})
    raw = read_raw(tmp_path / "q")
    assert count == 2
    assert raw[b"num-samples"] == b"2"
    assert raw[b"image-000000001"] == b"img1" and raw[b"label-000000002"] == "c d".encode()
    assert raw[b"origin-000000001"] == b"src\t7" and b"origin-000000002" not in raw
    assert raw[b"query-meta"] == b'{"ratio": 0.1}'


def test_interrupted_write_leaves_nothing(tmp_path):
    def samples():
        for k in range(1500):  # past the first batched commit
            yield png(), "ab", None
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        lmdb_writing.write_lmdb(str(tmp_path / "out"), samples())
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    write_set(tmp_path / "out", ["old"])
    with pytest.raises(UserError, match="already holds an LMDB"):
        write_set(tmp_path / "out", ["new"])

    def failing():
        yield png(), "new", None
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        lmdb_writing.write_lmdb(str(tmp_path / "out"), failing(), overwrite=True)
    assert read_raw(tmp_path / "out")[b"label-000000001"] == b"old"
    lmdb_writing.write_lmdb(str(tmp_path / "out"), [(png(), "new", None)], overwrite=True)
    assert read_raw(tmp_path / "out")[b"label-000000001"] == b"new"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user file")
    with pytest.raises(UserError, match="not an LMDB"):
        lmdb_writing.write_lmdb(str(tmp_path / "other"), [(png(), "x", None)], overwrite=True)


def test_map_grows_for_large_writes(tmp_path):
    big = os.urandom(1 << 20)
    count = lmdb_writing.write_lmdb(str(tmp_path / "big"), ((big, f"{k}", None) for k in range(80)))
    assert count == 80
    assert read_raw(tmp_path / "big")[b"image-000000080"] == big


# ---------------------------------------------------------------- synthetic generator

def test_generator_is_deterministic():
    first = list(synth.make_samples(6, "cvpr2016", (5, 1)))
    again = list(synth.make_samples(6, "cvpr2016", (5, 1)))
    other = list(synth.make_samples(6, "cvpr2016", (6, 1)))
    assert first == again
    assert first != other
    assert Image.open(io.BytesIO(first[0][0])).format == "JPEG"
    assert Image.open(io.BytesIO(list(synth.make_samples(1, "mixed", 5))[0][0])).format == "PNG"


def test_generator_output_does_not_depend_on_workers():
    serial = list(synth.make_samples(70, "nips2014", 11, workers=1))
    parallel = list(synth.make_samples(70, "nips2014", 11, workers=2))
    assert serial == parallel


def test_tiny_data_labels_are_mixed_case_words(tiny_data):
    labels = [v.decode() for k, v in read_raw(tiny_data.cvpr).items() if k.startswith(b"label-")]
    assert len(labels) == 120
    assert any(label.isupper() for label in labels) and any(label.islower() for label in labels)
    assert any(label.isdigit() for label in labels)
    words = {w.lower() for w in synth.load_words()}
    assert sum(label.lower() in words for label in labels) > 40  # about 68% are dictionary words


def test_unseen_fonts_are_not_training_fonts():
    seen, unseen = synth.split_fonts()
    assert unseen and seen and not set(seen) & set(unseen)
    rng = np.random.default_rng(0)
    img = synth.render_word("Hello", "nips2014", rng, unseen)
    assert img.mode == "RGB" and img.height == 32 and img.width > img.height
    with pytest.raises(UserError, match="cvpr2016"):
        synth.render_word("x", "nope", rng)


# ---------------------------------------------------------------- bad input: counts, pixel formats, disks

def test_negative_sample_count_names_the_lmdb(tmp_path, make_opt):
    path = tmp_path / "neg"
    env = lmdb.open(str(path), map_size=1 << 20)  # written raw: write_lmdb cannot make this
    with env.begin(write=True) as txn:
        txn.put(b"num-samples", b"-3")
    env.close()
    with pytest.raises(UserError) as info:
        dataset.LmdbDataset(str(path), make_opt())
    assert str(info.value) == f"{path}: 'num-samples' is negative (-3); rebuild the LMDB with create_lmdb_dataset.py"


def encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_sixteen_bit_grayscale_png_is_scaled_to_eight_bits():
    # 16-bit samples v become v >> 8 (v * 255 / 65535 rounded down but for 65535); Pillow's own
    # convert("L") would clip all but 0 to 255, an all-white image
    values = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    buf = encoded(values, "PNG")
    assert Image.open(io.BytesIO(buf)).mode in ("I;16", "I")  # by Pillow version
    gray = dataset.decode_image(buf, rgb=False)
    assert gray.mode == "L" and np.asarray(gray).tolist() == [[0, 0, 1, 128, 255, 255]]
    rgb = np.asarray(dataset.decode_image(buf, rgb=True))
    assert rgb.shape == (1, 6, 3) and rgb[0, :, 1].tolist() == [0, 0, 1, 128, 255, 255]


def test_pixels_of_unknown_range_count_as_unreadable(tmp_path, make_opt):
    wide = encoded(np.array([[0, 70000]], dtype=np.int32), "TIFF")     # mode I: 32-bit integers
    real = encoded(np.array([[0.0, 0.5]], dtype=np.float32), "TIFF")   # mode F
    write_set(tmp_path / "odd", ["ab", "cd", "ef"], images=[wide, png(60), real])
    ds = dataset.LmdbDataset(str(tmp_path / "odd"), make_opt())
    assert [ds[i][0] is None for i in range(3)] == [True, False, True]
    assert ds.num_undecodable == 2


def test_write_lmdb_output_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_set(tmp_path / "q", ["ab"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o750  # not mkdtemp's 0700


def test_full_disk_while_writing_is_a_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(env, items):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(lmdb_writing, "put_all", full)
    with pytest.raises(UserError) as info:
        write_set(tmp_path / "q", ["ab"])
    assert str(info.value) == (f"{tmp_path / 'q'}: writing the LMDB failed (mdb_txn_commit: No space left on "
                               f"device); free some space or choose another output folder")
    assert os.listdir(tmp_path) == []


def test_write_lmdb_removes_what_a_killed_writer_left(tmp_path):
    dead = 2 ** 22 + 1  # above the largest pid Linux allows, unless pid_max says more
    if os.path.exists("/proc/sys/kernel/pid_max"):
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            dead = max(dead, int(f.read()) + 1)
    stale = tmp_path / f".random_iter_1.{dead}.{atomic_io.host_tag()}.0123abcd.tmp"
    stale.mkdir()
    (stale / "data.mdb").write_bytes(b"\0" * 4096)
    os.utime(stale, (1e9, 1e9))
    write_set(tmp_path / "random_iter_2", ["ab"])
    assert os.listdir(tmp_path) == ["random_iter_2"]
