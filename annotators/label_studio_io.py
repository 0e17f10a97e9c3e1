"""Label Studio (docs/label-studio.md): the tasks an annotation package gives it, and the exports it
gives back.

Tasks. Each image goes to Label Studio either embedded in its task as a data URL (`tasks.json` of a
package whose images total at most EMBED_LIMIT bytes: nothing to configure, no storage), or as a
URL that Label Studio's local-files serving answers (`tasks-local-files.json`, and `tasks.json` of a
larger package): `/data/local-files/?d=<path below the document root>`, percent-encoded as Label
Studio's own storage writes it, served only while a Local Files storage of the project covers the
images folder. Every prediction carries the one MODEL_VERSION: Label Studio fixes a project's model
version at the first import and hides predictions of another version from the labelling queue, so a
team keeps one project across rounds; the round is in the task's data.

Exports. JSON (tasks with all their annotations, skipped ones marked `was_cancelled`), JSON_MIN
(one flat object per annotation; a task with none is one object without `annotation_id`; skipped
tasks are left out) and CSV (JSON_MIN's objects as rows). Each is read into one `TaskAnswers` per
task; anything of another shape is a UserError naming the task and the export to choose."""
import base64
import csv
import io
import json
import os
import urllib.parse

import utils

FROM_NAME, TO_NAME = "transcription", "image"  # the control and object names of LABEL_CONFIG
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Header value="Type the word exactly as written; leave it empty or type ### when it cannot be read"/>
  <TextArea name="transcription" toName="image" editable="true" maxSubmissions="1" rows="1"/>
</View>
"""
MODEL_VERSION = "robust-active-learning"
DOCUMENT_ROOT_VARIABLES = ("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT")
SERVING_VARIABLE = "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"
LOCAL_FILES_URL = "/data/local-files/?d="
# Measured on Label Studio 1.23.2 (docs/label-studio.md): 1000 embedded word images (2.7 MB of
# tasks) imported as fast as their local-files URLs (4.1 s each), 5000 (13.6 MB) twice as slowly,
# with the queue's next task 3 times slower; a project keeps every round's tasks and every export
# carries the images again. Up to this many bytes of images a package embeds them.
EMBED_LIMIT = 4 * 1024 * 1024
TASKS, LOCAL_TASKS = "tasks.json", "tasks-local-files.json"
MIME_TYPES = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "gif": "image/gif", "tif": "image/tiff",
              "webp": "image/webp"}
FORMATS = {"label_studio": "a Label Studio JSON export", "label_studio_min": "a Label Studio JSON_MIN export",
           "label_studio_csv": "a Label Studio CSV export"}
CHOOSE = "export the project from Label Studio as JSON (or JSON_MIN, CSV)"
# the columns of JSON_MIN and CSV that are not task data
ANNOTATION_COLUMNS = ("id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", FROM_NAME)


# ---------------------------------------------------------------------------------------------
# tasks


def document_root(folder):
    """The folder Label Studio's `?d=` paths are relative to: the document root set in the
    environment when `folder` lies below it, else the folder that holds `folder`."""
    folder = os.path.abspath(folder)
    for name in DOCUMENT_ROOT_VARIABLES:
        root = os.environ.get(name)
        if root and folder.startswith(os.path.abspath(root).rstrip(os.sep) + os.sep):
            return os.path.abspath(root)
    return os.path.dirname(folder)


def local_files_url(root, path):
    """The URL under which Label Studio serves `path` (a file below `root`, the document root)."""
    relative = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
    return LOCAL_FILES_URL + urllib.parse.quote(relative, safe="/")


def data_url(image_bytes, extension):
    mime = MIME_TYPES.get(extension, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"


def task(entry, image, round_name):
    """One task: `image` (a URL or a data URL), our file name, the origin, the kind and the round,
    and the model's reading as an editable prediction."""
    result = []
    if entry["reading"]:
        result.append({"id": "reading", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "textarea",
                       "value": {"text": [entry["reading"]]}})
    return {"data": {"image": image, "file": entry["file"], "origin": f"{entry['origin'][0]}:{entry['origin'][1]}",
                     "kind": entry["kind"], "round": round_name},
            "predictions": [{"model_version": MODEL_VERSION, "score": entry["confidence"], "result": result}]}


def setup(folder):
    """What a package at `folder` asks of Label Studio for its local-files tasks: the document root
    to start it with, the Local Files storage path to add (absolute, strictly below the root)."""
    folder = os.path.abspath(folder)
    return {"document_root": document_root(folder), "storage_path": os.path.join(folder, "images"),
            "model_version": MODEL_VERSION}


# ---------------------------------------------------------------------------------------------
# exports


class TaskAnswers:
    """What an export holds for one task: the `file` it names, `where` (for messages), `answers`
    (one `(text, number of lines)` per submitted annotation, oldest first) and `skipped` (the
    annotations cancelled with Skip)."""

    def __init__(self, file, where):
        self.file, self.where = file, where
        self.answers, self.skipped, self._times = [], 0, []

    def add(self, text, lines, when):
        self._times.append(when)
        self.answers.append((text, lines))
        order = sorted(range(len(self.answers)), key=lambda k: self._times[k])
        self.answers = [self.answers[k] for k in order]
        self._times = [self._times[k] for k in order]


def sniff(path, text):
    """The Label Studio format of an export's text, or None when it is none of them: JSON holds
    tasks with a `data` object, JSON_MIN flat objects, CSV a header row naming `file` and more
    columns than `file,label`."""
    if path.lower().endswith(".csv") or not text.lstrip().startswith(("[", "{")):
        try:
            first = next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])
        except csv.Error:  # no header of Label Studio's; the reader reports the row
            return None
        header = [cell.strip() for cell in first]
        return "label_studio_csv" if "file" in header and len(header) > 2 else None
    try:
        items = json.loads(text)
    except ValueError:
        return "label_studio"  # reported as not JSON by the reader
    items = items if isinstance(items, list) else [items]
    if any(isinstance(item, dict) and "data" not in item and "file" in item for item in items[:1]):
        return "label_studio_min"
    return "label_studio"


class Export(dict):
    """{file: TaskAnswers} of one round's tasks, in the export's order; `other_rounds` counts the
    tasks of other rounds ({round: tasks}) that the same project holds."""

    def __init__(self, round_name):
        super().__init__()
        self.round, self.other_rounds = round_name, {}

    def entry(self, data, name, where):
        """The TaskAnswers to fill for a task with `data`, or None for a task of another round."""
        task_round = data.get("round")
        if isinstance(task_round, str) and task_round and self.round and task_round != self.round:
            self.other_rounds[task_round] = self.other_rounds.get(task_round, 0) + 1
            return None
        return self.setdefault(name, TaskAnswers(name, where))


def read_export(path, text, fmt, round_name=None):
    """The Export of `round_name` (None: every task) in an export in `fmt` (one of FORMATS): a team
    keeps one project across rounds, so it holds the tasks of earlier rounds too, told apart by
    their `round`."""
    base = os.path.basename(path)
    found = Export(round_name)
    if fmt == "label_studio_csv":
        return _from_rows(found, base, _csv_rows(path, text), "CSV row", csv_text=True)
    try:
        items = json.loads(text)
    except ValueError as err:
        raise utils.UserError(f"--answers {path}: not JSON ({err}); {CHOOSE}") from None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise utils.UserError(f"--answers {path}: holds a {type(items).__name__}, not a list of tasks; {CHOOSE}")
    if fmt == "label_studio_min":
        return _from_rows(found, base, items, "item")
    return _from_tasks(found, base, items)


def _file_of(data, where):
    name = data.get("file")
    if not isinstance(name, str) or not name.strip():
        image = data.get("image")
        if name is None and isinstance(image, str) and "/images/" in image and not image.startswith("data:"):
            # a task re-created from the image URL alone
            return "images/" + urllib.parse.unquote(image.rsplit("/images/", 1)[1])
        raise utils.UserError(f"{where}: its data has no file name (\"file\": {name!r}); export the project that "
                              f"the package's tasks were imported into")
    return name


def _texts(value, where):
    """The lines of one textarea value: a list of strings, or one string."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise utils.UserError(f"{where}: the answer {json.dumps(value)[:60]} is not text (a string or a list of "
                          f"strings); correct the task in Label Studio and export again")


def _answer(lines, where):
    """`(text, number of lines)`: the non-empty lines joined by a space."""
    parts = [part.strip() for line in lines for part in line.splitlines()]
    parts = [part for part in parts if part]
    return " ".join(parts), len(parts)


def _annotation_text(annotation, where):
    result = annotation.get("result")
    if result is None:
        result = []
    if not isinstance(result, list):
        raise utils.UserError(f"{where}: its \"result\" is {json.dumps(result)[:40]}, not a list; {CHOOSE}")
    lines = []
    for item in result:
        if not isinstance(item, dict):
            raise utils.UserError(f"{where}: a result entry is {json.dumps(item)[:40]}, not an object; {CHOOSE}")
        if item.get("type") != "textarea" or item.get("from_name", FROM_NAME) != FROM_NAME:
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise utils.UserError(f"{where}: a transcription's \"value\" is {json.dumps(value)[:40]}, not an "
                                  f"object with \"text\"; {CHOOSE}")
        lines.extend(_texts(value.get("text") if value.get("text") is not None else [], where))
    return _answer(lines, where)


def _from_tasks(found, base, items):
    for number, item in enumerate(items, 1):
        where = f"{base} task {number}"
        if not isinstance(item, dict) or not isinstance(item.get("data"), dict):
            raise utils.UserError(f"{where}: no \"data\" object; {CHOOSE}")
        name = _file_of(item["data"], where)
        ident = f"id {item['id']}, " if isinstance(item.get("id"), int) else ""
        where = f"{where} ({ident}{name})"
        annotations = item.get("annotations")
        if annotations is None:
            annotations = []
        if not isinstance(annotations, list):
            raise utils.UserError(f"{where}: \"annotations\" is {json.dumps(annotations)[:40]}, not a list; "
                                  f"{CHOOSE}")
        entry = found.entry(item["data"], name, where)
        if entry is None:
            continue
        for position, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                raise utils.UserError(f"{where}: an annotation is {json.dumps(annotation)[:40]}, not an object; "
                                      f"{CHOOSE}")
            if annotation.get("was_cancelled"):
                entry.skipped += 1
                continue
            text, lines = _annotation_text(annotation, where)
            entry.add(text, lines, _when(annotation, position))
    return found


def _when(record, position):
    """A sort key for an annotation's time: updated, else created (ISO 8601 UTC strings sort as
    times), then its id and position."""
    stamp = record.get("updated_at") or record.get("created_at") or ""
    ident = record.get("annotation_id", record.get("id"))
    return (stamp if isinstance(stamp, str) else "", ident if isinstance(ident, int) else 0, position)


def _csv_rows(path, text):
    return list(csv_rows(csv.DictReader(io.StringIO(text)), path, first=2))


def csv_rows(reader, path, first=1):
    """The rows of a csv reader; a row the csv module cannot read (a field over its size limit, a
    stray quote) is a UserError naming `path` and the row."""
    number = first - 1
    try:
        for number, row in enumerate(reader, first):
            yield row
    except csv.Error as err:
        raise utils.UserError(f"--answers {path}: row {number + 1} cannot be read as CSV ({err}); no answer is "
                              f"that long: check the file, or {CHOOSE}") from None


def _from_rows(found, base, rows, unit, csv_text=False):
    """JSON_MIN items or CSV rows: one per annotation, one without `annotation_id` per task that
    has none; rows of one task (its `id`) gather."""
    for number, row in enumerate(rows, 2 if csv_text else 1):
        where = f"{base} {unit} {number}"
        if not isinstance(row, dict):
            raise utils.UserError(f"{where}: {json.dumps(row)[:40]} is not an object; {CHOOSE}")
        name = _file_of(row, where)
        task_id = row.get("id")
        where = f"{where} (task {task_id}, {name})" if task_id not in (None, "") else f"{where} ({name})"
        entry = found.entry(row, name, where)
        if entry is None or row.get("annotation_id") in (None, ""):
            continue  # a task nobody answered
        value = row.get(FROM_NAME)
        if csv_text:
            value = _decode_csv_cell(value)
        if isinstance(value, dict):  # several lines: {"text": [...]}
            value = value.get("text")
        text, lines = _answer(_texts(value if value is not None else [], where), where)
        entry.add(text, lines, _when(row, number))
    return found


def _decode_csv_cell(value):
    """A CSV cell of the transcription: text, or the JSON object Label Studio writes for several
    lines (`{"text": [...]}`)."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, dict) and "text" in decoded:
            return decoded
    return value
