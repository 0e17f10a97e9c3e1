"""Label Studio's side of annotation packages, on exports recorded from a real Label Studio 1.23.2
(tests/data/labelstudio, written by `tools/labelstudio_check.py --record`; no server needed here).

The recorded round: ten tasks answered through the HTTP API by their place in the labelling queue
(plan.json): the reading kept, corrected, skipped, an answer with a space, two annotations
('wtwxwxtx london' then the word), a two-line answer, ###, an empty answer, upper case, and one
left unanswered; then exported as JSON, JSON_MIN and CSV."""
import base64
import copy
import csv
import io
import json
import os
import shlex
import shutil
import urllib.parse

import pytest
import yaml

from annotators import annotation
import import_annotations
from annotators import label_studio_io
from annotators import round_commands
import train
import utils
from conftest import REPO_ROOT

RECORDED = os.path.join(REPO_ROOT, "tests", "data", "labelstudio")
EXPORTS = {"label_studio": "export.json", "label_studio_min": "export-min.json", "label_studio_csv": "export.csv"}


def recorded(name):
    with open(os.path.join(RECORDED, name), encoding="utf-8") as f:
        return f.read()


PLAN = json.loads(recorded("plan.json"))
FILES = PLAN["files"]  # plan step -> image file


@pytest.fixture
def package(tmp_path):
    """The recorded round's package (its manifest; the images are not needed to read answers) and
    a --train_data folder."""
    folder = tmp_path / "round 1 #b&c"
    folder.mkdir()
    shutil.copyfile(os.path.join(RECORDED, "package.json"), folder / "package.json")
    (tmp_path / "train").mkdir()
    return folder


def run_import(*argv):
    opt = import_annotations.get_args_parser().parse_args([str(a) for a in argv])
    return utils.exit_on_user_error(import_annotations.main)(opt)


def one_error_line(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        run_import(*argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def labels_of(answers):
    return {a.file: (a.label, a.skipped) for a in answers}


# ---------------------------------------------------------------------------------------------
# the three export formats


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_each_recorded_export_is_recognised_and_read_with_the_answers_given(package, fmt):
    path = os.path.join(RECORDED, EXPORTS[fmt])
    assert annotation.locate_answers(str(package), path) == (path, fmt)
    answers, warnings = annotation.read_answers(annotation.Package(str(package)), path, fmt)
    got = labels_of(answers)
    # every answered task with the label worked out from what was submitted: the latest of two
    # annotations, two lines joined by one space, case and inner spaces as typed; ### and an emptied
    # answer are kept as such for judge() to call unreadable
    submitted_text = {"###": "###", "empty": ""}
    for step, file in FILES.items():
        if step in ("skip", "unanswered"):
            continue
        expected = PLAN["labels"][file]
        assert got[file] == ((expected if expected is not None else submitted_text[step]), False), step
    assert got[FILES["two annotations"]][0] == PLAN["submitted"][FILES["two annotations"]][1][0]
    assert got[FILES["space"]][0].count(" ") == 1 and got[FILES["upper"]][0].isupper()
    # the task left unanswered is in every export, without an answer
    assert got[FILES["unanswered"]] == (None, False)
    # a skipped task is in JSON only (marked was_cancelled); JSON_MIN and CSV leave it out
    if fmt == "label_studio":
        assert got[FILES["skip"]] == (None, True)
    else:
        assert FILES["skip"] not in got
    assert len(got) == (10 if fmt == "label_studio" else 9)
    # the two annotations differ, so the import says which it took; the two lines are named too
    assert sum("2 different answers ('wtwxwxtx london', " in w and FILES["two annotations"] in w for w in warnings) == 1
    assert sum("an answer of 2 lines, joined by a space" in w and FILES["two lines"] in w for w in warnings) == 1


@pytest.mark.parametrize("fmt, reason", [("label_studio", "skipped"), ("label_studio_min", "not in the export"),
                                         ("label_studio_csv", "not in the export")])
def test_an_import_names_every_missing_image_and_why(package, capsys, fmt, reason):
    """Break 6: before, `no answer for images/... and 1 more`."""
    line = one_error_line(capsys, "--package", package, "--train_data", package.parent / "train", "--answers",
                          os.path.join(RECORDED, EXPORTS[fmt]))
    assert f"no answer for 2 images: {FILES['skip']} ({reason}" in line
    assert f"{FILES['unanswered']} (unanswered)" in line
    assert "answer the unanswered tasks in Label Studio and export again" in line
    if fmt == "label_studio":
        assert "pass --skipped unreadable to count skipped tasks as unreadable" in line
    else:
        assert "export the project as JSON to import them with --skipped unreadable" in line


def answered_json(steps=("unanswered",)):
    """The recorded JSON export with the tasks of `steps` answered 'word' (as a later export would be)."""
    tasks = json.loads(recorded("export.json"))
    for task in tasks:
        if task["data"]["file"] in [FILES[step] for step in steps]:
            task["annotations"].append({"id": 99, "result": [{"from_name": "transcription", "to_name": "image",
                                                              "type": "textarea", "value": {"text": ["word"]}}],
                                        "was_cancelled": False, "updated_at": "2026-12-07T18:00:00Z"})
    return tasks


def test_skipped_unreadable_counts_the_skipped_task_unreadable(package):
    pkg = annotation.Package(str(package))
    path = write(package.parent, "answered.json", answered_json())
    answers, _ = annotation.read_answers(pkg, str(path), "label_studio")
    judged = annotation.judge(pkg, answers, str(path), allow_unknown=True, skipped="unreadable", fmt="label_studio")
    decided = {image["file"]: (label, status) for image, label, status in judged.decisions}
    assert decided[FILES["skip"]] == (None, "unreadable")
    unreadable = {FILES["skip"], FILES["###"], FILES["empty"]}
    assert {f for f, (label, _) in decided.items() if label is None} == unreadable
    assert judged.counts["unreadable"] == 3 and len(judged.decisions) == 10
    # without the flag the skipped image is missing, named
    with pytest.raises(utils.UserError, match=f"no answer for 1 image: {FILES['skip']} \\(skipped\\)"):
        annotation.judge(pkg, answers, str(path), allow_unknown=True, fmt="label_studio")


def test_several_answers_latest_unreadable_or_refused(package):
    """Break 7: the last annotation won silently."""
    pkg = annotation.Package(str(package))
    path = os.path.join(RECORDED, "export.json")
    latest, _ = annotation.read_answers(pkg, path, "label_studio", several="latest")
    assert labels_of(latest)[FILES["two annotations"]] == (PLAN["labels"][FILES["two annotations"]], False)
    dropped, warnings = annotation.read_answers(pkg, path, "label_studio", several="unreadable")
    assert labels_of(dropped)[FILES["two annotations"]] == ("", False)
    assert any("counted unreadable (--several_answers unreadable)" in w for w in warnings)
    with pytest.raises(utils.UserError, match="2 different answers \\('wtwxwxtx london', "):
        annotation.read_answers(pkg, path, "label_studio", several="refuse")
    # the latest by time, not by place: the export lists the later annotation first here
    tasks = json.loads(recorded("export.json"))
    for task in tasks:
        if task["data"]["file"] == FILES["two annotations"]:
            task["annotations"].reverse()
    swapped = write(package.parent, "swapped.json", tasks)
    answers, _ = annotation.read_answers(pkg, str(swapped), "label_studio")
    assert labels_of(answers)[FILES["two annotations"]][0] == PLAN["labels"][FILES["two annotations"]]


def test_the_same_answer_twice_warns_nothing(package):
    tasks = json.loads(recorded("export.json"))
    for task in tasks:
        if task["data"]["file"] == FILES["correct"]:
            task["annotations"] = task["annotations"] * 2
    path = write(package.parent, "twice.json", tasks)
    answers, warnings = annotation.read_answers(annotation.Package(str(package)), str(path), "label_studio")
    assert labels_of(answers)[FILES["correct"]] == (PLAN["labels"][FILES["correct"]], False)
    assert not [w for w in warnings if FILES["correct"] in w]


def test_tasks_of_other_rounds_in_the_same_project_are_left_aside(package):
    """One project across rounds: round 2's export holds round 1's tasks too."""
    tasks = json.loads(recorded("export.json"))
    earlier = copy.deepcopy(tasks[:3])
    for task in earlier:
        task["data"]["round"] = "uncali_iter_0"
    path = write(package.parent, "project.json", earlier + tasks)
    answers, warnings = annotation.read_answers(annotation.Package(str(package)), str(path), "label_studio")
    assert labels_of(answers) == labels_of(annotation.read_answers(
        annotation.Package(str(package)), os.path.join(RECORDED, "export.json"), "label_studio")[0])
    assert "left aside the tasks of other rounds in the project (3 of uncali_iter_0)" in warnings[0]


# ---------------------------------------------------------------------------------------------
# exports of the wrong shape: one line, exit 2 (issue 22, items 1 and 8)


def mutate(file, change):
    """The recorded JSON export, every task answered, with `change(task)` applied to the task of
    `file`: the one thing wrong with it."""
    tasks = answered_json(("unanswered", "skip"))
    for task in tasks:
        if task["data"]["file"] == file:
            change(task)
    return tasks


def set_text(value):
    def change(task):
        task["annotations"][0]["result"][0]["value"]["text"] = value
    return change


@pytest.mark.parametrize("case, change, expected", [
    ("text [null]", set_text([None]), "the answer [null] is not text"),
    ("text [5]", set_text([5]), "the answer [5] is not text"),
    ("value a string", lambda t: t["annotations"][0]["result"][0].update(value="hello"),
     "a transcription's \"value\" is \"hello\", not an object"),
    ("file a number", lambda t: t["data"].update(file=123), "its data has no file name (\"file\": 123)"),
    ("annotations a number", lambda t: t.update(annotations=5), "\"annotations\" is 5, not a list"),
    ("result a number", lambda t: t["annotations"][0].update(result=5), "its \"result\" is 5, not a list"),
    ("annotation a string", lambda t: t.update(annotations=["x"]), "an annotation is \"x\", not an object"),
])
def test_a_label_studio_answer_of_the_wrong_shape_is_one_error_naming_the_task(package, capsys, case, change,
                                                                               expected):
    """Before: `[null]` imported as the word None; the others were tracebacks."""
    path = write(package.parent, "export.json", mutate(FILES["correct"], change))
    line = one_error_line(capsys, "--package", package, "--train_data", package.parent / "train", "--answers", path,
                          "--allow_unknown_characters")
    task = "task 2 (id 2, " if case != "file a number" else "task 2"
    assert f"export.json {task}" in line and expected in line, line
    assert sorted(os.listdir(package.parent / "train")) == []


def test_a_text_string_instead_of_a_list_is_the_answer_itself(package):
    """Before: "hello" became 'h e l l o'."""
    path = write(package.parent, "export.json", mutate(FILES["correct"], set_text("hello")))
    answers, _ = annotation.read_answers(annotation.Package(str(package)), str(path), "label_studio")
    assert labels_of(answers)[FILES["correct"]] == ("hello", False)


@pytest.mark.parametrize("kind", ["file,label", "file,label without header", "label studio"])
def test_a_csv_field_over_the_csv_limit_is_one_error(package, capsys, kind):
    """Before: `_csv.Error: field larger than field limit (131072)`."""
    long = "x" * (csv.field_size_limit() + 1)
    if kind == "file,label":
        text = f"file,label\n{FILES['keep']},\"{long}\"\n"
    elif kind == "file,label without header":
        text = f"{FILES['keep']},\"{long}\"\n"
    else:
        rows = recorded("export.csv").splitlines()
        rows[2] = rows[2].replace('"valerianic"', f'"{long}"')
        text = "\n".join(rows) + "\n"
    path = write(package.parent, "answers.csv", text)
    line = one_error_line(capsys, "--package", package, "--train_data", package.parent / "train", "--answers", path)
    assert f"--answers {path}: row" in line and "cannot be read as CSV (field larger than field limit" in line


def test_a_csv_of_label_studio_is_not_mistaken_for_file_label(package, capsys):
    """Break 5: before, `11 columns, expected 2 (file,label)`; a file,label CSV still reads as one."""
    path = os.path.join(RECORDED, "export.csv")
    assert annotation.locate_answers(str(package), path)[1] == "label_studio_csv"
    simple = write(package.parent, "answers.csv", f"file,label\n{FILES['keep']},abc\n")
    assert annotation.locate_answers(str(package), str(simple))[1] == "csv"
    # JSON_MIN saved under any name ending .json
    assert annotation.locate_answers(str(package), os.path.join(RECORDED, "export-min.json"))[1] == "label_studio_min"


def test_a_two_item_text_in_json_min_and_csv_is_joined(package):
    """Label Studio writes a textarea with several items as {"text": [...]} in JSON_MIN and as that
    JSON in a CSV cell."""
    rows = json.loads(recorded("export-min.json"))
    for row in rows:
        if row["file"] == FILES["correct"]:
            row["transcription"] = {"text": ["ab", "cd"]}
    path = write(package.parent, "min.json", rows)
    answers, warnings = annotation.read_answers(annotation.Package(str(package)), str(path), "label_studio_min")
    assert labels_of(answers)[FILES["correct"]] == ("ab cd", False)
    assert any(FILES["correct"] in w and "2 lines" in w for w in warnings)
    table = list(csv.DictReader(io.StringIO(recorded("export.csv"))))
    for row in table:
        if row["file"] == FILES["correct"]:
            row["transcription"] = json.dumps({"text": ["ab", "cd"]})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    path = write(package.parent, "rows.csv", out.getvalue())
    answers, _ = annotation.read_answers(annotation.Package(str(package)), str(path), "label_studio_csv")
    assert labels_of(answers)[FILES["correct"]] == ("ab cd", False)


# ---------------------------------------------------------------------------------------------
# writing a package: tasks, image URLs, README.txt


PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")


def write_tiny_package(folder, train_data, round_name="uncali_iter_2", count=2):
    records = [{"image": PNG, "path": None, "origin": ("CVPR2016", k), "reading": f"word{k}", "confidence": 0.5,
                "score": 0.5} for k in range(1, count + 1)]
    manifest = {"format": annotation.FORMAT, "round": round_name, "train_data": str(train_data),
                "model": str(train_data.parent / "models" / "round1" / "best_accuracy.pth"), "strategy": "uncali",
                "charset": {"character": "abc", "lowercase": True, "batch_max_length": 25},
                "selection": {"select_data": ["CVPR2016"], "batch_ratio": [1.0], "unlabelled": [], "pool_data": []},
                "query_meta": {"strategy": "uncali", "num_query": count}}
    return annotation.write_package(str(folder), records, manifest, False, str(train_data / round_name))


def test_image_urls_are_percent_encoded_and_relative_to_the_document_root(tmp_path, monkeypatch):
    """Break 4: `/data/local-files/?d=round 2 #b&c/images/...` made every image 404."""
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    monkeypatch.delenv("LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    train_data = tmp_path / "train"
    train_data.mkdir()
    folder = tmp_path / "annotation" / "round 2 #b&c+%"
    manifest = write_tiny_package(folder, train_data)
    local = json.loads((folder / "tasks-local-files.json").read_text(encoding="utf-8"))
    url = local[0]["data"]["image"]
    assert url == "/data/local-files/?d=round%202%20%23b%26c%2B%25/images/CVPR2016_1.png"
    # what the server reads from the query string: the path below the document root
    d = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["d"][0]
    studio = manifest["label_studio"]
    assert studio["document_root"] == str(tmp_path / "annotation")
    assert os.path.join(studio["document_root"], d) == str(folder / "images" / "CVPR2016_1.png")
    assert studio["storage_path"] == str(folder / "images")
    # with the document root set when exporting (the folder Label Studio serves), the paths start there
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    other = tmp_path / "annotation" / "r3"
    manifest = write_tiny_package(other, train_data, round_name="uncali_iter_3")
    url = json.loads((other / "tasks-local-files.json").read_text())[0]["data"]["image"]
    assert url == "/data/local-files/?d=annotation/r3/images/CVPR2016_1.png"
    assert manifest["label_studio"]["document_root"] == str(tmp_path)


def test_one_model_version_for_every_round_and_the_round_in_the_data(tmp_path):
    """Break 3: the model version named the round, so from round 2 on Label Studio's queue (which
    shows the project's model version only, fixed at the first import) had no pre-fill."""
    train_data = tmp_path / "train"
    train_data.mkdir()
    versions, rounds = set(), set()
    for name in ("uncali_iter_1", "uncali_iter_2"):
        write_tiny_package(tmp_path / name, train_data, round_name=name)
        for tasks in ("tasks.json", "tasks-local-files.json"):
            for task in json.loads((tmp_path / name / tasks).read_text()):
                versions |= {p["model_version"] for p in task["predictions"]}
                rounds.add(task["data"]["round"])
    assert versions == {label_studio_io.MODEL_VERSION} and rounds == {"uncali_iter_1", "uncali_iter_2"}


def test_a_small_package_embeds_its_images_a_large_one_serves_local_files(tmp_path, monkeypatch):
    train_data = tmp_path / "train"
    train_data.mkdir()
    write_tiny_package(tmp_path / "small", train_data, round_name="uncali_iter_1")
    task = json.loads((tmp_path / "small" / "tasks.json").read_text())[0]
    assert task["data"]["image"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert base64.b64decode(task["data"]["image"].split(",", 1)[1]) == (tmp_path / "small" / "images" /
                                                                        "CVPR2016_1.png").read_bytes()
    monkeypatch.setattr(label_studio_io, "EMBED_LIMIT", len(PNG))  # one image fits, two do not
    manifest = write_tiny_package(tmp_path / "large", train_data, round_name="uncali_iter_2")
    assert sorted(p.name for p in (tmp_path / "large").glob("tasks*.json")) == ["tasks.json"]
    task = json.loads((tmp_path / "large" / "tasks.json").read_text())[0]
    assert task["data"]["image"].startswith("/data/local-files/?d=large/images/")
    assert manifest["label_studio"]["tasks"] == {"tasks.json": "local files"}
    assert "too large to embed" in (tmp_path / "large" / "README.txt").read_text()


def test_readme_gives_the_storage_the_document_root_and_commands_that_run_anywhere(tmp_path, monkeypatch):
    """Breaks 1 and 2: a relative storage path (refused by Label Studio), no word about syncing,
    and an import command with relative paths that failed from the project root."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("train")
    write_tiny_package("pkgs/round 1", tmp_path / "train", round_name="uncali_iter_1")
    readme = (tmp_path / "pkgs" / "round 1" / "README.txt").read_text()
    assert f"\n  {tmp_path / 'pkgs' / 'round 1' / 'images'}\nand do NOT sync it" in readme
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={tmp_path / 'pkgs'}\n" in readme
    assert "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true" in readme
    assert f'model version "{label_studio_io.MODEL_VERSION}"' in readme and "--skipped unreadable" in readme
    commands = [line.strip() for line in readme.splitlines() if "import_annotations.py --package" in line]
    assert len(commands) == 2
    for command in commands:
        words = shlex.split(command)
        assert words[1] == os.path.join(REPO_ROOT, "import_annotations.py")
        assert words[words.index("--package") + 1] == str(tmp_path / "pkgs" / "round 1")
        assert words[words.index("--train_data") + 1] == str(tmp_path / "train")
    assert shlex.split(commands[1])[-2:] == ["--answers", "EXPORT.json"]


# ---------------------------------------------------------------------------------------------
# the next round's commands


def test_the_next_round_commands_repeat_the_recorded_settings_with_absolute_paths(tmp_path):
    """The import printed only `train.py --mode al --select_data ... --batch_ratio ...`."""
    run_folder = tmp_path / "run"
    model_dir = run_folder / "saved" / "round0"
    model_dir.mkdir(parents=True)
    (run_folder / "valid").mkdir()
    model = model_dir / "best_accuracy.pth"
    saved = {"Transformation": "None", "FeatureExtraction": "VGG", "SequenceModeling": "BiLSTM", "Prediction": "CTC",
             "output_channel": 64, "hidden_size": 32, "character": "abc", "sensitive": False, "valid_data": "valid",
             "output_dir": "saved", "exp_name": "round0", "num_iter": 300, "valInterval": 100, "adam": True,
             "lr": 0.001, "calibrator": "boost_soft", "alpha": 0.1, "batch_size": 48, "manualSeed": 7,
             "total_data_usage_ratio": 0.3, "amp": False, "warmup_iters": 10, "lr_schedule": "cosine"}
    (model_dir / "opt.yaml").write_text(yaml.safe_dump(saved))
    manifest = {"model": str(model), "train_data": str(run_folder / "train"), "strategy": "uncali",
                "selection": {"select_data": ["A", "B"], "batch_ratio": [0.5, 0.5], "pool_data": ["P"]},
                "query_meta": {"strategy": "uncali", "num_query": 40, "acquisition": "power",
                               "acquisition_beta": 2.0, "seed": 7, "total_data_usage_ratio": 0.3},
                "relabel": {"policy": "agree", "meta": {"relabel_ratio": 0.25}}}
    commands = round_commands.commands(manifest, "uncali_iter_1", "A-B-uncali_iter_1", "0.25-0.25-0.5")
    words = shlex.split(commands["train"])
    assert words[1] == os.path.join(REPO_ROOT, "train.py")
    opt = train.get_args_parser().parse_args(words[2:])
    # every recorded setting, the valid data found from the folder training ran in
    for name, value in saved.items():
        if name not in ("valid_data", "output_dir", "exp_name"):
            assert getattr(opt, name) in (value, str(value)), name  # ratios stay text until resolved
    assert opt.valid_data == str(run_folder / "valid")
    assert (opt.mode, opt.saved_model, opt.select_data, opt.batch_ratio) == ("al", str(model), "A-B-uncali_iter_1",
                                                                             "0.25-0.25-0.5")
    assert (opt.output_dir, opt.exp_name, opt.query_iter) == (str(run_folder / "saved"), "uncali_iter_1",
                                                              "uncali_iter_1")
    assert commands["model"] == str(run_folder / "saved" / "uncali_iter_1" / "best_accuracy.pth")
    words = shlex.split(commands["sampling"])
    assert words[1] == os.path.join(REPO_ROOT, "data_sampling.py")
    flags = dict(zip(words[2::2], words[3::2]))
    assert flags == {"--train_data": str(run_folder / "train"), "--select_data": "A-B", "--batch_ratio": "0.5-0.5",
                     "--saved_model": commands["model"], "--query": "uncali", "--num_query": "40",
                     "--acquisition": "power", "--acquisition_beta": "2.0", "--pool_data": "P",
                     "--relabel_ratio": "0.25", "--relabel_policy": "agree", "--valid_data": str(run_folder / "valid"),
                     "--total_data_usage_ratio": "0.3", "--batch_size": "48", "--manualSeed": "7",
                     "--out_name": "uncali_iter_2",
                     "--export_annotation": str(run_folder / "train" / "uncali_iter_2_annotation")}
    # without an opt.yaml the settings are unknown: no command, the import says what to add
    (model_dir / "opt.yaml").unlink()
    assert round_commands.commands(manifest, "uncali_iter_1", "A-B-uncali_iter_1", "0.25-0.25-0.5") == {}
