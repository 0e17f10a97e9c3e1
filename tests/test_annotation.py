"""Real annotators: unlabelled pools, annotation packages out and answers back in, and the loop
that waits for them (create_lmdb_dataset.py --unlabelled, data_sampling.py --export_annotation,
import_annotations.py, annotators/annotation.py, scripts/al_loop.sh --annotator human)."""
import base64
import csv
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import types

import pytest

from annotators import annotation
import create_lmdb_dataset
import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
import import_annotations
import options
import utils
from conftest import REPO_ROOT
from test_al_loop import ARCH, run_loop
from test_eval_scripts import load_script
from test_sampling import CTC_ARCH, ctc_args, listing, read_set, run_main, save_model
from test_sampling import models, one_thread, work  # noqa: F401  (fixtures)


def source_label(train, origin):
    with lmdb_format.shared_env(os.path.join(train, origin[0])).begin() as txn:
        return txn.get(b"label-%09d" % origin[1]).decode()


def source_image(train, origin):
    with lmdb_format.shared_env(os.path.join(train, origin[0])).begin() as txn:
        return txn.get(b"image-%09d" % origin[1])


def manifest(package):
    return json.loads((package / "package.json").read_text(encoding="utf-8"))


def run_import(*argv):
    """import_annotations in-process, as its __main__ block runs it (UserError -> SystemExit 2)."""
    opt = import_annotations.get_args_parser().parse_args([str(a) for a in argv])
    return utils.exit_on_user_error(import_annotations.main)(opt)


def error_line(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def hidden(folder):
    """Leftovers of an interrupted write (the lock file and the record of waiting packages are not)."""
    return [name for name in os.listdir(folder)
            if name.startswith(".") and not name.endswith(".lock") and name != annotation.PENDING]


# ---------------------------------------------------------------------------------------------
# the round trip with a transcriber who corrects gt.txt


def test_gt_round_trip_writes_the_query_set_and_keeps_unreadable_images_out(work, models, make_opt, capsys):
    train = work / "train_data_lmdb"
    package = work / "round1_package"
    pool_before = run_main(ctc_args(work, models.ctc, "--num_query", "1", "--dry_run"))["pool_size"]
    summary = run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "6",
                                "--export_annotation", str(package)))
    out = capsys.readouterr().out
    # a package instead of the query set, and the summary says so with the import command; the
    # round's package is recorded as waiting under --train_data
    assert listing(train) == [annotation.PENDING, "CVPR2016", "NIPS2014"]
    assert annotation.read_pending(str(train)) == {"uncali_iter_1": str(package)}
    assert summary["query_set"] is None and summary["num_picked"] == 6 and summary["round"] == "uncali_iter_1"
    assert "no query set is written yet" in out and "import_annotations.py --package" in out
    assert sorted(os.listdir(package)) == ["README.txt", "gt.txt", "images", "label_config.xml", "package.json",
                                           "predictions.csv", "tasks-local-files.json", "tasks.json"]
    assert hidden(work) == []
    meta = manifest(package)
    images = meta["images"]
    assert len(images) == 6 and len({i["file"] for i in images}) == 6
    gt_lines = (package / "gt.txt").read_text(encoding="utf-8").splitlines()
    with open(package / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tasks = json.loads((package / "tasks.json").read_text(encoding="utf-8"))
    local = json.loads((package / "tasks-local-files.json").read_text(encoding="utf-8"))
    for image, line, row, task, local_task in zip(images, gt_lines, rows, tasks, local):
        relpath, index = image["origin"]
        data = (package / image["file"]).read_bytes()
        assert data == source_image(str(train), (relpath, index))  # the original bytes
        assert image["sha256"] == hashlib.sha256(data).hexdigest()
        extension = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"  # the synthetic sets hold both
        assert image["file"] == f"images/{relpath}_{index}.{extension}"  # the name says where it came from
        assert line == f"{image['file']}\t{image['reading']}"  # pre-filled with the model's reading
        assert (row["file"], row["origin"], row["reading"]) == (image["file"], f"{relpath}:{index}", image["reading"])
        assert float(row["confidence"]) == pytest.approx(image["confidence"])
        # a small package embeds its images in tasks.json; tasks-local-files.json points at them
        mime = "image/jpeg" if extension == "jpg" else "image/png"
        assert task["data"]["file"] == image["file"] and task["data"]["round"] == "uncali_iter_1"
        assert task["data"]["image"] == f"data:{mime};base64,{base64.b64encode(data).decode()}"
        assert local_task["data"]["image"] == f"/data/local-files/?d=round1_package/{image['file']}"
        assert local_task["predictions"] == task["predictions"]
        prediction = task["predictions"][0]
        assert prediction["score"] == image["confidence"]
        texts = [r["value"]["text"] for r in prediction["result"] if r["type"] == "textarea"]
        assert texts == ([[image["reading"]]] if image["reading"] else [])
    # uncali picks the least confident first
    confidences = [i["confidence"] for i in images]
    assert max(confidences) <= summary["mean_confidence"]["pool"]

    # the transcriber: the true word for four, ### for one, an emptied answer (tab kept) for another
    truth = [source_label(str(train), tuple(i["origin"])) for i in images]
    answers = truth[:2] + ["###", ""] + ["  " + truth[4], truth[5]]  # surrounding spaces are dropped
    (package / "gt.txt").write_text("".join(f"{i['file']}\t{a}\n" for i, a in zip(images, answers)), encoding="utf-8")
    result = run_import("--package", package, "--train_data", train)
    printed = capsys.readouterr().out

    trainable = [0, 1, 4, 5]
    changed = sum(truth[k].lower() != images[k]["reading"] for k in trainable)
    assert (result["num_picked"], result["unreadable"], result["changed"], result["unchanged"]) == \
        (4, 2, changed, 4 - changed)
    assert result["accuracy"]["picked"] == (4 - changed) / 4
    assert (result["next_select_data"], result["next_batch_ratio"]) == ("CVPR2016-NIPS2014-uncali_iter_1",
                                                                      "0.25-0.25-0.5")
    assert f"{changed} corrected, 2 unreadable" in printed
    assert listing(train) == ["CVPR2016", "NIPS2014", "uncali_iter_1"]  # the import forgot the record
    rows, query_meta = read_set(str(train / "uncali_iter_1"))
    assert [(image, label, origin) for image, label, origin in rows] == \
        [(source_image(str(train), tuple(images[k]["origin"])), truth[k], tuple(images[k]["origin"]))
         for k in trainable]
    assert query_meta["annotation"]["unreadable"] == 2 and query_meta["num_picked"] == 4
    assert json.loads((train / "uncali_iter_1" / "summary.json").read_text())["num_picked"] == 4
    # the unreadable two count as queried, but training reads only the four
    assert set_records.read_query_origins(str(train)) == {tuple(i["origin"]) for i in images}
    opt = make_opt(**CTC_ARCH, total_data_usage_ratio="0.7")
    labelled, _ = dataset.hierarchical_dataset(str(train), opt, ["uncali_iter_1"], split="labelled")
    assert [label for _, label, _ in (labelled[i] for i in range(len(labelled)))] == \
        [truth[k].lower() for k in trainable]
    # the next round's pool leaves all six out
    assert run_main(ctc_args(work, models.ctc, "--num_query", "1", "--dry_run"))["pool_size"] == pool_before - 6
    # importing again finds the name taken
    message = error_line(capsys, lambda: run_import("--package", package, "--train_data", train))
    assert "uncali_iter_1 already exists" in message


# ---------------------------------------------------------------------------------------------
# an unlabelled pool, answered through Label Studio


def write_crops(folder, train):
    """A folder of word images without labels (in sub-folders, with a file that is no image),
    taken from NIPS2014 below `train`: {relative path: (bytes, true label)}."""
    truth = {}
    for k in range(1, 9):
        rel = f"{'shop' if k % 2 else 'street/left'}/word{k}.png"
        (folder / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        data = source_image(train, ("NIPS2014", k))
        (folder / rel).write_bytes(data)
        truth[rel] = (data, source_label(train, ("NIPS2014", k)))
    (folder / "notes.txt").write_text("not an image")
    return truth


@pytest.fixture
def crops(work):
    folder = work / "crops"
    return folder, write_crops(folder, str(work / "train_data_lmdb"))


def test_unlabelled_lmdb_holds_every_image_with_its_path(work, crops, capsys):
    folder, truth = crops
    out = work / "pool"
    create_lmdb_dataset.main(["--unlabelled", "--inputPath", str(folder), "--outputPath", str(out)])
    captured = capsys.readouterr()
    assert "Created unlabelled dataset with 8 images" in captured.out
    assert "skipped 1 file(s)" in captured.out and "notes.txt" in captured.err
    with lmdb_format.shared_env(str(out)).begin() as txn:
        raw = dict(txn.cursor())
    assert raw[b"num-samples"] == b"8" and raw[b"unlabelled"] == b"1"
    order = sorted(truth)  # sorted by path: shop/... before street/left/...
    for k, rel in enumerate(order, 1):
        assert raw[b"path-%09d" % k] == rel.encode() and raw[b"image-%09d" % k] == truth[rel][0]
        assert raw[b"label-%09d" % k] == b""
    message = error_line(capsys, lambda: create_lmdb_dataset.main(
        ["--unlabelled", "--gtFile", "gt.txt", "--inputPath", str(folder), "--outputPath", str(work / "other")]))
    assert "--gtFile gt.txt with --unlabelled" in message


def test_train_and_test_refuse_an_unlabelled_lmdb(work, crops, models, capsys):
    folder, _ = crops
    pool = work / "train_data_lmdb" / "Crops"
    create_lmdb_dataset.create_unlabelled_dataset(str(folder), str(pool))
    capsys.readouterr()
    test_script, train_script = load_script("test"), load_script("train")
    argv = ["--eval_data", str(pool), "--saved_model", models.ctc, "--device", "cpu", "--workers", "0"]
    message = error_line(capsys, lambda: utils.exit_on_user_error(test_script.main)(
        options.parse_with_given(test_script.get_args_parser(), argv)))
    assert f"--eval_data {pool}: an unlabelled LMDB" in message
    arch = [f"--{k}={v}" for k, v in CTC_ARCH.items() if k in ("Transformation", "FeatureExtraction",
                                                              "SequenceModeling", "Prediction")]
    argv = ["--train_data", str(work / "train_data_lmdb"), "--valid_data", str(work / "test_data_lmdb"),
            "--select_data", "CVPR2016-Crops", "--batch_ratio", "0.5-0.5", "--dry_run", "--device", "cpu",
            "--workers", "0", "--output_dir", str(work / "models"), *arch]
    message = error_line(capsys, lambda: utils.exit_on_user_error(train_script.main)(
        train_script.get_args_parser().parse_args(argv)))
    assert f"--train_data {pool}: an unlabelled LMDB" in message


def label_studio_export(tasks, answers):
    """What Label Studio exports after the transcribers worked: per task an early answer, the one
    that counts, then a skipped (cancelled) one."""
    exported = []
    for k, (task, answer) in enumerate(zip(tasks, answers)):
        def done(text, cancelled=False):
            result = [{"id": f"r{k}", "from_name": "transcription", "to_name": "image", "type": "textarea",
                       "value": {"text": [text]}}] if text else []
            return {"id": 100 + k, "result": result, "was_cancelled": cancelled, "ground_truth": False}
        exported.append({"id": k + 1, "data": task["data"], "predictions": task["predictions"],
                         "annotations": [done("draft"), done(answer), done("skipped", cancelled=True)]})
    return exported


def test_unlabelled_pool_is_queried_whole_and_answered_in_label_studio(work, crops, models, capsys):
    folder, truth = crops
    train = work / "train_data_lmdb"
    create_lmdb_dataset.create_unlabelled_dataset(str(folder), str(train / "Crops"))
    capsys.readouterr()
    argv = ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5")
    argv[argv.index("CVPR2016-NIPS2014")] = "Crops"
    argv += ["--batch_ratio", "1"]
    summary = run_main(argv)
    out = capsys.readouterr().out
    package = train / "uncali_iter_1_annotation"  # the default place, beside the query set to be
    # the whole LMDB is the pool though --total_data_usage_ratio is 0.7; no query set is written
    assert summary["pool_size"] == 8 and summary["accuracy"] == {"picked": None, "pool": None}
    assert listing(train) == [annotation.PENDING, "CVPR2016", "Crops", "NIPS2014", "uncali_iter_1_annotation"]
    assert f"annotation -> {package}" in out
    images = manifest(package)["images"]
    paths = sorted(truth)
    for image in images:
        assert image["origin"][0] == "Crops" and image["path"] == paths[image["origin"][1] - 1]
        stem = os.path.splitext(image["path"])[0].replace("/", "__")
        extension = "jpg" if truth[image["path"]][0][:3] == b"\xff\xd8\xff" else "png"
        assert image["file"] == f"images/Crops__{stem}_{image['origin'][1]}.{extension}"
    answers = [truth[i["path"]][1] for i in images]
    export = work / "project-1-export.json"
    tasks = json.loads((package / "tasks.json").read_text())
    export.write_text(json.dumps(label_studio_export(tasks, answers)))
    result = run_import("--package", package, "--train_data", train, "--answers", export)
    assert (result["num_picked"], result["unreadable"], result["format"]) == (5, 0, "label_studio")
    # nothing of the unlabelled pool trains: the next round trains on the query set alone
    assert (result["next_select_data"], result["next_batch_ratio"]) == ("uncali_iter_1", "1")
    rows, _ = read_set(str(train / "uncali_iter_1"))
    assert [(label, origin) for _, label, origin in rows] == [(a, tuple(i["origin"])) for a, i in zip(answers, images)]
    # a second round: five drawn, the other three are left
    argv[argv.index("5")] = "8"
    assert run_main(argv + ["--dry_run"])["pool_size"] == 3


# ---------------------------------------------------------------------------------------------
# a query set without one readable answer: queried, never trained on


def test_an_import_without_a_readable_answer_is_queried_but_never_trained_on(work, models, make_opt, capsys):
    train = work / "train_data_lmdb"
    package = work / "package"
    pool_before = run_main(ctc_args(work, models.ctc, "--num_query", "1", "--dry_run"))["pool_size"]
    run_main(ctc_args(work, models.ctc, "--num_query", "3", "--export_annotation", str(package)))
    images = manifest(package)["images"]
    (package / "gt.txt").write_text("".join(f"{i['file']}\t{a}\n" for i, a in zip(images, ["###", "", " ### "])))
    result = run_import("--package", package, "--train_data", train)
    assert (result["num_picked"], result["unreadable"]) == (0, 3)
    assert "warning: no answer is readable" in capsys.readouterr().out
    # the next training is the base selection as it was; the empty query set exists all the same
    assert (result["next_select_data"], result["next_batch_ratio"]) == ("CVPR2016-NIPS2014", "0.5-0.5")
    assert read_set(str(train / "random_iter_1"))[0] == []
    # a later round leaves the three out of its pool, counts the round in its name, and proposes
    # every query set but the empty one
    later = run_main(ctc_args(work, models.ctc, "--num_query", "2"))
    assert (later["query_set"], later["pool_size"]) == ("random_iter_2", pool_before - 3)
    assert (later["next_select_data"], later["next_batch_ratio"]) == ("CVPR2016-NIPS2014-random_iter_2",
                                                                      "0.25-0.25-0.5")
    # named in --select_data too: no pool of its own, and still not proposed (its share is dropped
    # before the rule halves the base shares)
    argv = ctc_args(work, models.ctc, "--num_query", "2", "--batch_ratio", "0.25-0.25-0.5")
    argv[argv.index("CVPR2016-NIPS2014")] = "CVPR2016-NIPS2014-random_iter_1"
    named = run_main(argv)
    assert (named["query_set"], named["pool_size"]) == ("random_iter_3", pool_before - 5)
    assert (named["next_select_data"], named["next_batch_ratio"]) == \
        ("CVPR2016-NIPS2014-random_iter_2-random_iter_3", "0.25-0.25-0.25-0.25")
    capsys.readouterr()

    # training on a selection that names it anyway: skipped with one warning, the rest trains
    opt = make_opt(train_data=str(train), select_data="CVPR2016-NIPS2014-random_iter_1", batch_ratio="0.25-0.25-0.5",
                   batch_size=32, total_data_usage_ratio="0.7")
    loader = dataset.Batch_Balanced_Dataset(opt)
    assert loader.names == ["CVPR2016", "NIPS2014"] and loader.batch_sizes == {"CVPR2016": 8, "NIPS2014": 8}
    assert loader.warnings == ["--select_data random_iter_1: the query set random_iter_1 holds no sample (every answer "
                               "was unreadable; it only keeps those images out of later pools), so it is skipped and "
                               "its batch share 0.5 stays unused; drop it and its share from --select_data and "
                               "--batch_ratio"]
    images, labels, _ = loader.get_batch()
    assert len(labels) == 16 and images.shape[0] == 16
    with pytest.raises(utils.UserError, match="--select_data random_iter_1: only empty query sets, nothing to train on"):
        dataset.Batch_Balanced_Dataset(make_opt(train_data=str(train), select_data="random_iter_1", batch_ratio="1"))


# ---------------------------------------------------------------------------------------------
# --pool_data: datasets that are queried and never trained on


def test_pool_data_is_queried_whole_and_never_proposed_for_training(work, crops, models, capsys):
    folder, _ = crops
    train = work / "train_data_lmdb"
    create_lmdb_dataset.create_unlabelled_dataset(str(folder), str(train / "Crops"))
    package = work / "package"
    # The label filter keeps 111 of CVPR2016 and 115 of NIPS2014 (the tiny sets hold a few words
    # out of charset or too long); --total_data_usage_ratio 0.7 labels int(0.7 x 111) = 77 and
    # int(0.7 x 115) = 80 of them. The pool: the other 34 + 35 and all 8 crops; a package, as the
    # crops have no labels.
    summary = run_main(ctc_args(work, models.ctc, "--num_query", "5", "--pool_data", "Crops",
                                "--export_annotation", str(package)))
    assert summary["pool_size"] == 34 + 35 + 8 and summary["round"] == "random_iter_1"
    selection = manifest(package)["selection"]
    assert (selection["select_data"], selection["pool_data"]) == (["CVPR2016", "NIPS2014"], ["Crops"])
    origins = [tuple(i["origin"]) for i in manifest(package)["images"]]
    capsys.readouterr()

    # the round waits for its answers: drawing it again into another folder is refused
    message = error_line(capsys, lambda: run_main(ctc_args(
        work, models.ctc, "--num_query", "5", "--pool_data", "Crops", "--export_annotation", str(work / "again"),
        "--dry_run")))
    assert f"round random_iter_1 has a package waiting for its answers in {package}" in message
    assert f"import_annotations.py --package {package} --train_data {train}" in message
    # --overwrite draws it again (dry run: nothing is written)
    again = run_main(ctc_args(work, models.ctc, "--num_query", "5", "--pool_data", "Crops", "--export_annotation",
                              str(work / "again"), "--overwrite", "--dry_run"))
    assert again["package"] == str(work / "again") and not (work / "again").exists()

    gt = [line.split("\t")[0] + "\tword" for line in (package / "gt.txt").read_text().splitlines()]
    (package / "gt.txt").write_text("\n".join(gt) + "\n")
    result = run_import("--package", package, "--train_data", train)
    # the next training: the base sets and the new query set, not the pool dataset
    assert (result["next_select_data"], result["next_batch_ratio"]) == ("CVPR2016-NIPS2014-random_iter_1",
                                                                      "0.25-0.25-0.5")
    assert annotation.read_pending(str(train)) == {} and not (train / annotation.PENDING).exists()

    # a labelled set as pool: all 115 of NIPS2014 besides the 34 of CVPR2016, less what round 1 took
    argv = ctc_args(work, models.ctc, "--num_query", "4", "--batch_ratio", "1", "--pool_data", "NIPS2014")
    argv[argv.index("CVPR2016-NIPS2014")] = "CVPR2016"
    taken = sum(1 for relpath, _ in origins if relpath != "Crops")
    summary = run_main(argv)
    assert summary["pool_size"] == 34 + 115 - taken and summary["query_set"] == "random_iter_2"
    # NIPS2014 is never proposed; the earlier query set is
    assert (summary["next_select_data"], summary["next_batch_ratio"]) == \
        ("CVPR2016-random_iter_1-random_iter_2", "0.5-0.25-0.25")
    capsys.readouterr()

    for name, expected in [
        ("NIPS2014", "--pool_data NIPS2014: NIPS2014 is selected by --select_data CVPR2016-NIPS2014 too"),
        ("random_iter_1", "--pool_data random_iter_1: selects the query set random_iter_1"),
        ("Nope", "--pool_data Nope: no LMDB below"),
    ]:
        message = error_line(capsys, lambda: run_main(ctc_args(work, models.ctc, "--num_query", "1",
                                                               "--pool_data", name, "--dry_run")))
        assert message.startswith(f"error: {expected}"), message


# ---------------------------------------------------------------------------------------------
# bad answers: one line naming the culprit, exit 2, nothing written


@pytest.fixture(scope="module")
def exported(tiny_data, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    shutil.copytree(tiny_data.train, root / "train_data_lmdb")
    shutil.copytree(tiny_data.valid, root / "test_data_lmdb")
    package = root / "package"
    run_main(ctc_args(root, models.ctc, "--num_query", "4", "--export_annotation", str(package)))
    return root, package


def gt_answers(package, truth):
    return [f"{image['file']}\t{label}" for image, label in zip(manifest(package)["images"], truth)]


@pytest.mark.parametrize("case, expected", [
    ("missing", "answers.txt: no answer for 1 image: images/"),
    ("duplicate", "answers.txt line 5: a second answer for images/"),
    ("unknown file", "answers.txt line 5: names no exported image (images/elsewhere.png)"),
    ("unknown characters", "answers.txt line 2: 'ab$' holds characters the model does not know ('$')"),
    ("no tab", "answers.txt line 3: no tab between the file and the answer"),
    ("csv duplicate", "answers.csv row 4: a second answer for images/"),
    ("label studio skipped", "export.json: no answer for 1 image: images/"),
])
def test_a_bad_answer_file_exits_2_naming_it_and_writes_nothing(exported, capsys, case, expected):
    root, package = exported
    train = root / "train_data_lmdb"
    lines = gt_answers(package, ["abc", "ab$" if case == "unknown characters" else "ab", "x", "y"])
    name = "answers.txt"
    if case == "missing":
        lines = lines[:3]
    elif case == "duplicate":
        lines.append(lines[0])
    elif case == "unknown file":
        lines.append("images/elsewhere.png\tabc")
    elif case == "no tab":
        lines[2] = lines[2].replace("\t", " ")
    if case == "csv duplicate":
        name = "answers.csv"
        files = [line.split("\t") for line in lines]
        lines = ["file,label"] + [f"{f},{a}" for f, a in files[:2] + files[1:2] + files[2:]]
    if case == "label studio skipped":
        name = "export.json"
        tasks = json.loads((package / "tasks.json").read_text())
        export = label_studio_export(tasks, [line.split("\t")[1] for line in lines])
        export[2]["annotations"] = [a for a in export[2]["annotations"] if a["was_cancelled"]]
        text = json.dumps(export)
    else:
        text = "\n".join(lines) + "\n"
    answers = root / name
    answers.write_text(text, encoding="utf-8")
    before = listing(train)
    message = error_line(capsys, lambda: run_import("--package", package, "--train_data", train, "--answers", answers))
    assert expected in message
    assert listing(train) == before and hidden(train) == []
    answers.unlink()


def test_unknown_characters_are_kept_when_allowed_and_reported(exported, capsys):
    root, package = exported
    answers = root / "allowed.txt"
    answers.write_text("\n".join(gt_answers(package, ["abc", "ab$", "###", "y"])) + "\n", encoding="utf-8")
    result = run_import("--package", package, "--train_data", root / "train_data_lmdb", "--answers", answers,
                        "--allow_unknown_characters", "--dry_run")
    printed = capsys.readouterr().out
    assert (result["num_picked"], result["unreadable"], result["unknown_characters"]) == (3, 1, 1)
    assert "allowed.txt line 2: 'ab$' holds characters outside the charset ('$')" in printed
    assert "dry run: nothing written" in printed
    assert listing(root / "train_data_lmdb") == [annotation.PENDING, "CVPR2016", "NIPS2014"]  # still waiting


def test_a_package_imported_into_another_root_is_refused(exported, tmp_path, capsys):
    _, package = exported
    other = tmp_path / "other_root"
    (other / "CVPR2016").mkdir(parents=True)
    lmdb_writing.write_lmdb(str(other / "CVPR2016"), [(b"x", "a", None)], overwrite=True)
    message = error_line(capsys, lambda: run_import("--package", package, "--train_data", other))
    assert "give the root it was drawn from" in message or "give the root the package was drawn from" in message
    assert listing(other) == ["CVPR2016"]


# ---------------------------------------------------------------------------------------------
# the loop waits for its annotators and continues after the import
#
# Round 0 of the run is made here, as a finished one looks (its settings, model, training summary
# and evaluation), so that the loop's own steps are the only ones that run: a real round 0 would
# add a minute of training and checks to what is tested.

LOOP_SETTINGS = {"TRAIN_DATA": None, "VALID_DATA": None, "TEST_DATA": None, "SELECT_DATA": "CVPR2016-NIPS2014",
                 "BATCH_RATIO": "0.5-0.5", "LABEL_RATIO": "0.5", "QUERY": "random", "BASE_CALIBRATOR": "CE",
                 "AL_CALIBRATOR": "boost_soft", "QUERY_RATIO": "0.01", "NUM_QUERY": "15", "NOISE_RATIO": "0",
                 "BASE_ITERS": "2", "ITERS": "2", "VAL_INTERVAL": "1", "ARCH": ARCH, "TRAIN_ARGS": "",
                 "BATCH_SIZE": "8", "SEED": "1111", "ANNOTATOR": "human", "RELABEL_RATIO": "0.2", "POOL_DATA": "Crops"}
LOOP_ARCH = dict(CTC_ARCH, SequenceModeling="BiLSTM", output_channel=32, hidden_size=16)  # test_al_loop's ARCH


@pytest.fixture(scope="module")
def loop_data(tiny_data, tmp_path_factory):
    """The tiny data for the loop, with an unlabelled LMDB Crops (8 images of NIPS2014) beside
    links to the base sets: `train` and `valid` as in tiny_data."""
    root = tmp_path_factory.mktemp("loop_data")
    train = root / "train"
    train.mkdir()
    for name in ("CVPR2016", "NIPS2014"):
        os.symlink(os.path.join(tiny_data.train, name), train / name)
    write_crops(root / "crops", tiny_data.train)
    create_lmdb_dataset.create_unlabelled_dataset(str(root / "crops"), str(train / "Crops"))
    return types.SimpleNamespace(train=str(train), valid=tiny_data.valid)


def finished_round_0(tiny_data, out):
    run = out / "random"
    settings = dict(LOOP_SETTINGS, TRAIN_DATA=tiny_data.train, VALID_DATA=tiny_data.valid, TEST_DATA=tiny_data.valid)
    (run / "eval" / "round0").mkdir(parents=True)
    (run / "loop_settings.txt").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    save_model(str(run / "models" / "round0"), LOOP_ARCH, sharpen=300.0)
    (run / "models" / "round0" / "train_summary.json").write_text(json.dumps({"labelled_total": 120}))
    metrics = {"accuracy": 0.0, "ece": 0.5, "ace": 0.5}
    (run / "eval" / "round0" / "results.json").write_text(json.dumps({"sets": [{"name": "synth_eval", **metrics}],
                                                                      "total": metrics}))
    return run


def printed_command(stdout, marker):
    """The command line printed after `marker` (the loop's instructions)."""
    lines = stdout.splitlines()
    return shlex.split(lines[lines.index(next(line for line in lines if marker in line)) + 1])


def run_until_training(argv):
    """Run the loop until it starts a training step, then stop it (its process group, which this
    test started): the output up to there."""
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env={**os.environ, "PYTHON": sys.executable}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("+ ") and " train.py " in line:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    return "".join(seen)


def test_the_human_loop_stops_for_the_answers_and_continues_after_the_import(loop_data, tmp_path, capsys):
    run = finished_round_0(loop_data, tmp_path)
    first = run_loop(loop_data, tmp_path, "--annotator", "human", "--pool_data", "Crops", "--relabel_ratio", "0.2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "round 0: trained already" in first.stdout  # the prepared round counts as finished
    # the pool: the unlabelled half of the base sets (111 - 55 and 115 - 57 after the label filter)
    # and the 8 unlabelled crops; of the budget of 15, round(0.2 x 15) = 3 go to second looks at the
    # labelled half (55 + 57 labels)
    assert "exported 12 of 122 pool samples" in first.stdout
    assert "exported 3 of 112 labelled samples (lowest label quality) for a second look" in first.stdout
    package = run / "train_data" / "random_iter_1_annotation"
    assert (package / "package.json").is_file() and not (run / "train_data" / "random_iter_1").exists()
    kinds = [image["kind"] for image in manifest(package)["images"]]
    assert kinds == ["query"] * 12 + ["relabel"] * 3 and not (run / "models" / "round1").exists()
    assert "round 1 waits for its annotators" in first.stdout
    import_argv = printed_command(first.stdout, "import the answers")
    assert import_argv == [sys.executable, "import_annotations.py", "--package", str(package),
                           "--train_data", str(run / "train_data")]
    continue_argv = printed_command(first.stdout, "continue the loop")
    assert continue_argv[-6:] == ["--annotator", "human", "--pool_data", "Crops", "--relabel_ratio", "0.2"]
    assert "--out" in continue_argv

    # again before the import: nothing is drawn again, the same instructions
    stamp = (package / "package.json").stat().st_mtime_ns
    again = subprocess.run(continue_argv, cwd=REPO_ROOT, env={**os.environ, "PYTHON": sys.executable},
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round 1: exported already" in again.stdout and "data_sampling.py" not in again.stdout
    assert printed_command(again.stdout, "import the answers") == import_argv
    assert (package / "package.json").stat().st_mtime_ns == stamp

    # the transcriber keeps the model's readings but marks the first image (a new one) unreadable
    gt = (package / "gt.txt").read_text().splitlines()
    gt[0] = gt[0].split("\t")[0] + "\t###"
    (package / "gt.txt").write_text("\n".join(gt) + "\n")
    result = run_import(*import_argv[2:])
    capsys.readouterr()
    assert (result["num_picked"], result["unreadable"], result["relabel"]["num_relabelled"]) == (11, 1, 3)

    # after the import the same command goes on with round 1, training on the imported set
    done = run_until_training(continue_argv)
    assert "round 1: queried already" in done and "waits for its annotators" not in done
    assert ("--select_data CVPR2016-NIPS2014-random_iter_1-random_iter_1_relabel --batch_ratio 0.25-0.25-0.5-0"
            in done.splitlines()[-1])


@pytest.mark.parametrize("extra, message", [
    (("--annotator", "robot"), "--annotator robot: unknown; choose simulated or human"),
    (("--annotator", "human", "--noise_ratio", "0.2"), "--noise_ratio 0.2: simulated annotator noise has no place"),
    (("--pool_data", "Crops"), "--pool_data Crops: Crops holds no labels for a simulated annotator to answer with; "
                               "pass --annotator human"),
    (("--pool_data", "NIPS2014"), "--pool_data NIPS2014: named by --select_data too"),
    (("--pool_data", "Crops-Nope"), "--pool_data Nope: "),
])
def test_the_loop_checks_its_annotator_and_pool_before_the_first_command(loop_data, tmp_path, extra, message):
    result = run_loop(loop_data, tmp_path, *extra)
    errors = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}")
    assert os.listdir(tmp_path) == []
