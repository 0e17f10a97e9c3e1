"""Second looks by human annotators: data_sampling.py --relabel_ratio with --export_annotation puts
the labelled samples of lowest label quality into the package beside the new ones, and
import_annotations.py turns their answers into the round's relabel set, which training applies by
the round's policy (an unreadable second answer takes the sample out)."""
import csv
import json
import os
import shutil

import pytest

from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
import find_label_errors
import options
import utils
from test_annotation import error_line, manifest, run_import
from test_label_errors import WORDS, png, render, tiny  # noqa: F401 (fixture)
from test_relabel import USAGE, relabel_set, run_sampling, sampling_args, training_view

# base holds the 24 numbers; at --total_data_usage_ratio 0.5 its labelled part is 1-12, and q_iter_1
# holds base 9-16, so training reads base 1-8 and q_iter_1's 8 (16 labels). Three of q_iter_1's labels
# are wrong; the model is overfit to the clean ones, so their label quality is the lowest of the 16.
WRONG = {("base", 9): "999", ("base", 10): "888", ("base", 11): "777"}


def write_data(root):
    images = [png(render(word)) for word in WORDS]
    lmdb_writing.write_lmdb(os.path.join(root, "base"), ((image, word, None) for image, word in zip(images, WORDS)))
    meta = {"name": "q_iter_1", "strategy": "random", "total_data_usage_ratio": float(USAGE)}
    lmdb_writing.write_lmdb(os.path.join(root, "q_iter_1"),
                            ((images[i - 1], WRONG.get(("base", i), WORDS[i - 1]), ("base", i)) for i in range(9, 17)),
                            meta=meta)


def export(tmp_path_factory, model, policy):
    """A round of 8 (round(0.5 x 8) = 4 second looks, 4 new samples) exported into a package."""
    folder = tmp_path_factory.mktemp(f"second_looks_{policy}")
    root = str(folder / "data")
    write_data(root)
    package = folder / "package"
    summary = run_sampling(sampling_args(root, model, "--num_query", "8", "--relabel_ratio", "0.5",
                                         "--relabel_policy", policy, "--out_name", "q_iter_2",
                                         "--export_annotation", str(package)))
    return root, package, summary


@pytest.fixture(scope="module")
def replace_round(tiny, tmp_path_factory):  # noqa: F811 (the imported fixture)
    return export(tmp_path_factory, tiny.ctc, "replace")


@pytest.fixture(scope="module")
def agree_round(tiny, tmp_path_factory):  # noqa: F811
    return export(tmp_path_factory, tiny.ctc, "agree")


def answers(package):
    """The transcriber's gt.txt: the true word for every new image; of the second looks, base 9
    corrected, base 10's wrong label confirmed, base 11 unreadable, the fourth (a right label)
    confirmed."""
    lines = []
    for image in manifest(package)["images"]:
        origin = tuple(image["origin"])
        truth = WORDS[origin[1] - 1]
        label = {("base", 10): WRONG[("base", 10)], ("base", 11): "###"}.get(origin, truth)
        lines.append(f"{image['file']}\t{label}")
    (package / "gt.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_the_package_holds_the_lowest_label_qualities_beside_the_new_samples(replace_round):
    root, package, summary = replace_round
    written = manifest(package)
    second = [image for image in written["images"] if image["kind"] == "relabel"]
    new = [image for image in written["images"] if image["kind"] == "query"]
    assert len(second) == 4 and len(new) == 4
    origins = {tuple(image["origin"]) for image in second}
    assert set(WRONG) < origins  # the three wrong labels, and one right label of lowest quality
    fourth = (origins - set(WRONG)).pop()
    assert fourth[0] == "base" and 1 <= fourth[1] <= 16
    # each second look carries the label trained on; the reading (the model's, not that label) is
    # pre-filled, so the transcriber's answer is their own
    for image in second:
        origin = tuple(image["origin"])
        assert image["label"] == WRONG.get(origin, WORDS[origin[1] - 1])
        with open(package / image["file"], "rb") as f:
            assert f.read() == png(render(WORDS[origin[1] - 1]))
    lowest = max(image["score"] for image in second if tuple(image["origin"]) in WRONG)
    assert lowest < next(image["score"] for image in second if tuple(image["origin"]) == fourth)
    assert all(17 <= image["origin"][1] <= 24 for image in new)  # the pool: base 17-24
    gt = (package / "gt.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in gt] == [image["file"] for image in written["images"]]
    with open(package / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["kind"] for row in rows) == ["query"] * 4 + ["relabel"] * 4
    assert {row["label"] for row in rows if row["kind"] == "relabel"} >= set(WRONG.values())
    tasks = json.loads((package / "tasks.json").read_text(encoding="utf-8"))
    assert sum(task["data"]["kind"] == "relabel" for task in tasks) == 4
    assert written["relabel"]["name"] == "q_iter_2_relabel" and written["relabel"]["policy"] == "replace"
    assert written["relabel"]["meta"]["round"] == 2
    assert "4 of them were labelled before" in (package / "README.txt").read_text(encoding="utf-8")
    # nothing is written under the root until the answers come back
    assert not os.path.exists(os.path.join(root, "q_iter_2")) and not os.path.exists(os.path.join(root,
                                                                                                  "q_iter_2_relabel"))
    part = summary["relabel"]
    assert part["exported"] and part["num_relabelled"] == 4 and part["labelled"] == 16 and summary["num_picked"] == 4


def test_an_import_writes_the_relabel_set_that_training_applies(replace_round, capsys):
    root, package, _ = replace_round
    answers(package)
    before, _ = training_view(root, "base-q_iter_1", "0.5-0.5", noise=0.0)
    summary = run_import("--package", package, "--train_data", root)
    out = capsys.readouterr().out
    part = summary["relabel"]
    assert (part["num_relabelled"], part["confirmed"], part["changed"], part["unreadable"], part["dropped"]) == \
        (4, 2, 1, 1, 1)
    assert part["changes"] == [{"file": next(i["file"] for i in manifest(package)["images"]
                                             if tuple(i["origin"]) == ("base", 9)), "label": "999", "answer": WORDS[8]}]
    assert "2 confirmed, 1 changed, 1 unreadable; 1 leave training" in out
    # the new images make the query set as before; the relabel set takes the share 0 at the end
    assert summary["num_answers"] == 4 and summary["num_picked"] == 4 and summary["unreadable"] == 0
    assert summary["next_select_data"] == "base-q_iter_1-q_iter_2-q_iter_2_relabel"
    assert summary["next_batch_ratio"] == "0.5-0.25-0.25-0"
    rows, meta = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    assert sorted(rows) == sorted([(("base", 9), WORDS[8]), (("base", 10), "888")] +
                                  [(o, WORDS[o[1] - 1]) for o, _ in rows if o not in WRONG])
    assert len(rows) == 3
    with lmdb_format.shared_env(os.path.join(root, "q_iter_2_relabel")).begin(write=False) as txn:
        assert set_records.read_unreadable_origins(txn) == [("base", 11)]
    assert meta["policy"] == "replace" and meta["query_set"] == "q_iter_2" and meta["round"] == 2
    assert meta["annotation"]["confirmed"] == 2 and meta["annotation"]["unreadable"] == 1
    # training: base 9 corrected, base 10 still wrong (confirmed), base 11 out, 4 new samples
    after, balanced = training_view(root, summary["next_select_data"], summary["next_batch_ratio"], noise=0.0)
    assert after[("base", 9)] == WORDS[8] and after[("base", 10)] == "888" and ("base", 11) not in after
    assert len(after) == 16 - 1 + 4
    assert all(after[i] == label for i, label in before.items() if i not in WRONG)
    assert balanced.names == ["base", "q_iter_1", "q_iter_2"]


def test_agree_drops_the_samples_whose_two_answers_differ(agree_round, capsys):
    root, package, _ = agree_round
    answers(package)
    summary = run_import("--package", package, "--train_data", root)
    part = summary["relabel"]
    assert part["policy"] == "agree" and (part["confirmed"], part["changed"], part["dropped"]) == (2, 1, 2)
    after, _ = training_view(root, summary["next_select_data"], summary["next_batch_ratio"], noise=0.0)
    # base 9 (999 against its true word) and base 11 (unreadable) leave; base 10's confirmed label stays
    assert ("base", 9) not in after and ("base", 11) not in after and after[("base", 10)] == "888"
    assert len(after) == 16 - 2 + 4


def test_a_second_import_needs_overwrite_and_an_orphaned_relabel_set_is_replaced(tiny, tmp_path_factory,  # noqa
                                                                                 capsys):
    root, package, _ = export(tmp_path_factory, tiny.ctc, "replace")
    answers(package)
    run_import("--package", package, "--train_data", root)
    message = error_line(capsys, lambda: run_import("--package", package, "--train_data", root))
    assert f"{os.path.join(root, 'q_iter_2')} already exists" in message
    # the relabel set is published first: an import stopped before its query set leaves it orphaned,
    # and the rerun replaces it without --overwrite
    shutil.rmtree(os.path.join(root, "q_iter_2"))
    (package / "gt.txt").write_text((package / "gt.txt").read_text().replace("\t888\n", f"\t{WORDS[9]}\n"))
    summary = run_import("--package", package, "--train_data", root)
    assert summary["relabel"]["changed"] == 2
    rows, _ = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    assert dict(rows)[("base", 10)] == WORDS[9]
    # --overwrite replaces both
    (package / "gt.txt").write_text((package / "gt.txt").read_text().replace(f"\t{WORDS[9]}\n", "\t888\n"))
    again = run_import("--package", package, "--train_data", root, "--overwrite")
    assert again["relabel"]["changed"] == 1
    rows, _ = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    assert dict(rows)[("base", 10)] == "888"


# a review outside the loop: find_label_errors.py --export_annotation


def run_finder(root, model, out, *extra):
    opt = options.parse_with_given(find_label_errors.get_args_parser(),
                                   ["--saved_model", model, "--train_data", root, "--select_data", "base-q_iter_1",
                                    "--total_data_usage_ratio", USAGE, "--out", str(out), "--workers", "0",
                                    "--device", "cpu", "--no_progress", *extra])
    return utils.exit_on_user_error(find_label_errors.main)(opt)


def test_a_review_sends_the_flagged_labels_to_annotators_and_writes_only_a_relabel_set(tiny, tmp_path,  # noqa
                                                                                     capsys):
    root = str(tmp_path / "data")
    write_data(root)
    package = tmp_path / "review"
    found = run_finder(root, tiny.ctc, tmp_path / "errors", "--batch_ratio", "0.5-0.5", "--num_issues", "3",
                       "--export_annotation", str(package))
    out = capsys.readouterr().out
    assert found["review"]["name"] == "label_review_2" and found["review"]["num_relabelled"] == 3
    assert "exported 3 flagged labels for a second look" in out and "import_annotations.py --package" in out
    written = manifest(package)
    assert written["review"] and written["round"] == "label_review_2"
    # the three lowest label qualities are the three wrong labels, each with the label trained on
    assert {tuple(image["origin"]): image["label"] for image in written["images"]} == WRONG
    assert all(image["kind"] == "relabel" for image in written["images"])
    assert not os.path.exists(os.path.join(root, "label_review_2"))
    answers(package)
    summary = run_import("--package", package, "--train_data", root)
    part = summary["relabel"]
    assert (part["num_relabelled"], part["confirmed"], part["changed"], part["unreadable"], part["dropped"]) == \
        (3, 1, 1, 1, 1)
    assert sorted(os.listdir(root)) == ["base", "label_review_2", "q_iter_1"]  # no query set
    assert (summary["next_select_data"], summary["next_batch_ratio"]) == ("base-q_iter_1-label_review_2", "0.5-0.5-0")
    assert "next training: train.py --select_data base-q_iter_1-label_review_2 --batch_ratio 0.5-0.5-0" in \
        capsys.readouterr().out
    rows, meta = relabel_set(os.path.join(root, "label_review_2"))
    assert dict(rows) == {("base", 9): WORDS[8], ("base", 10): "888"} and meta["review"] and meta["round"] == 2
    after, _ = training_view(root, summary["next_select_data"], summary["next_batch_ratio"], noise=0.0)
    assert after[("base", 9)] == WORDS[8] and ("base", 11) not in after and len(after) == 15
    # the next sampling round keeps the review's relabel set at the share 0
    sampled = run_sampling(sampling_args(root, tiny.ctc, "--num_query", "4", "--out_name", "q_iter_2"))
    assert sampled["next_select_data"] == "base-q_iter_1-q_iter_2-label_review_2"
    assert sampled["next_batch_ratio"] == "0.5-0.25-0.25-0"
    # the name is taken now: a second review needs another --review_name, before any scoring
    message = error_line(capsys, lambda: run_finder(root, tiny.ctc, tmp_path / "again", "--num_issues", "2",
                                                    "--export_annotation", str(tmp_path / "review2"),
                                                    "--review_name", "label_review_2"))
    assert message == (f"error: {os.path.join(root, 'label_review_2')} already exists; choose another --review_name "
                       f"or pass --overwrite")


def test_a_review_applies_before_the_relabel_set_of_the_round_sampled_after_it(tmp_path):
    root = str(tmp_path / "data")
    write_data(root)
    with lmdb_format.shared_env(os.path.join(root, "base")).begin(write=False) as txn:
        image = txn.get(lmdb_format.image_key(1))
    for name, label, review in (("bald_iter_2_relabel", "111", False), ("label_review_2", "222", True)):
        meta = {"name": name, "round": 2, "policy": "replace", **({"review": True} if review else {})}
        lmdb_writing.write_lmdb(os.path.join(root, name), iter([(image, label, ("base", 1))]), meta=meta,
                                meta_key=lmdb_format.RELABEL_META_KEY)
    # natural order alone would put bald_... first; the review was made before round 2's sampling
    assert set_records.relabel_order(root, ["bald_iter_2_relabel", "label_review_2"]) == \
        ["label_review_2", "bald_iter_2_relabel"]
    labels, _ = training_view(root, "base-q_iter_1-label_review_2-bald_iter_2_relabel", "0.5-0.5-0-0", noise=0.0)
    assert labels[("base", 1)] == "111"
