"""Annotation packages: what real annotators get and give back.

`data_sampling.py --export_annotation` writes a package, the folder a transcriber works in:

    images/<file>      the picked images, their original bytes
    gt.txt             `images/<file><TAB><the model's reading>`, to be corrected in place
    predictions.csv    file, origin, path, reading, confidence, score
    tasks.json         the same as Label Studio tasks, the reading as a prediction, the images
                       embedded when small, else served as local files (annotators/label_studio_io.py)
    tasks-local-files.json  (small packages) the tasks with local-files image URLs
    label_config.xml   the Label Studio labeling configuration those tasks fit
    README.txt         what to do, for the transcriber
    package.json       the manifest: round, --train_data, each image's origin and hash, and the
                       charset options that decide which answers the model can learn

`import_annotations.py` reads the answers back (the corrected gt.txt, a Label Studio export in
JSON, JSON_MIN or CSV, or a `file,label` CSV), checks them against the manifest and writes the
query set.
Answers that are empty or `###` mark an image as unreadable: it is kept out of training and
recorded in the query set (`unreadable-%09d`, set_records.read_unreadable_origins) so that later
pools leave it out too.

With `--relabel_ratio` the package also holds labelled samples chosen for a second look (their
manifest entries have the kind `relabel` and the label trained on). They are answered like the
others, and their answers become the round's relabel set (active_learning/relabel.py), which training applies by
the round's --relabel_policy; an unreadable second answer takes the sample out of training.
`find_label_errors.py --export_annotation` writes a review package: second looks alone, outside
any sampling round (`review` in the manifest); its import writes only the relabel set."""
import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
from datetime import datetime, timezone

from PIL import Image

from safe_files import atomic_io
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
from annotators import label_quality
from annotators import label_studio_io
from active_learning import query_sets
from active_learning import query_strategies
from active_learning import relabel_policies
from annotators import round_commands
import utils

MARKER = "package.json"
PENDING = ".annotation-pending.json"  # under --train_data (hidden from the LMDB finder): round -> package
FORMAT = 1
UNREADABLE_MARK = "###"
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "WEBP": "webp"}
MAX_STEM = 120  # characters of a file name's origin part: names stay well under 255 bytes
ANSWER_FORMATS = {"gt": "gt.txt lines", "csv": "file,label CSV", **label_studio_io.FORMATS}
SKIPPED = ("missing", "unreadable")  # --skipped: a task skipped in Label Studio has no answer, or an unreadable one
SEVERAL = ("latest", "unreadable", "refuse")  # --several_answers: a task answered more than once
QUERY, RELABEL = "query", "relabel"  # an image's kind: a new sample, or a labelled one looked at again
OUTCOMES = ("confirmed", "changed", "unreadable")  # of a second look, against the label trained on


# ---------------------------------------------------------------------------------------------
# writing a package


def image_extension(image_bytes):
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            fmt = image.format or ""
    except Exception:  # picked samples decoded once already; an odd format still exports
        fmt = ""
    return IMAGE_EXTENSIONS.get(fmt, fmt.lower() or "bin")


def safe_stem(text):
    """`text` as a portable file-name part: `/` becomes `__`, anything but letters, digits, `.`,
    `_` and `-` becomes `_`; no leading dot (a hidden file); the tail kept when too long."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", text.replace("/", "__")).lstrip(".") or "_"
    return stem[-MAX_STEM:]


def file_name(relpath, index, source_path, extension, taken):
    """`<LMDB relpath>[__<image path without extension>]_<index>.<ext>`, unique among `taken`: the
    name alone says where the image came from."""
    stem = relpath if relpath != "." else "root"
    if source_path:
        stem += "/" + os.path.splitext(source_path)[0]
    name = f"{safe_stem(stem)}_{index}.{extension}"
    k = 2
    while name in taken:  # two origins that differ only in characters made safe
        name = f"{safe_stem(stem)}_{index}-{k}.{extension}"
        k += 1
    taken.add(name)
    return name


def read_images(root, identities):
    """`(image bytes, image path or None)` of each `(relpath, index)` below root, the bytes as stored."""
    for relpath, index in identities:
        with lmdb_format.shared_env(os.path.join(root, relpath)).begin(write=False) as txn:
            image = txn.get(lmdb_format.image_key(index))
            path = txn.get(lmdb_format.path_key(index))
        if image is None:
            raise utils.UserError(f"{os.path.join(root, relpath)}: sample {index} vanished while sampling; "
                                  f"was the dataset rewritten?")
        yield image, None if path is None else path.decode("utf-8")


def second_look_records(root, columns, rows, identities):
    """The package records of a second look at the labelled samples `rows` of label-quality columns
    (label_quality.score_dataset's, any order), `identities` theirs: the image where the identity
    points (a query set's sample: its origin), the model's reading pre-filled as for a new sample
    (not the label trained on, so that the answer is the transcriber's own), the reading's
    confidence, the label quality as score, and the label trained on."""
    for row, identity, (data, path) in zip(rows, identities, read_images(root, identities)):
        yield {"image": data, "path": path, "origin": identity, "reading": columns["reading"][row],
               "confidence": float(label_quality.quality(columns["reading_log_prob"][row])),
               "score": float(label_quality.quality(columns["log_quality"][row])),
               "kind": RELABEL, "label": columns["label"][row]}


def check_folder_free(folder, overwrite, marker, flag, what, avoid=None, avoid_what="the query set"):
    """A folder an export writes: new, empty, or (with --overwrite) an earlier export of its kind,
    recognised by the marker file it holds; nothing else is ever deleted. `avoid` (a path) must
    neither hold it nor lie inside it."""
    if avoid:
        target, other = os.path.realpath(folder), os.path.realpath(avoid)
        if target == other or target.startswith(other + os.sep) or other.startswith(target + os.sep):
            raise utils.UserError(f"{flag} {folder}: overlaps {avoid_what} {avoid}; export elsewhere")
    if not os.path.lexists(folder) or (os.path.isdir(folder) and not os.path.islink(folder)
                                       and not os.listdir(folder)):
        return
    if not overwrite:
        raise utils.UserError(f"{flag} {folder} already exists; choose another folder or pass --overwrite")
    if os.path.islink(folder) or not os.path.isfile(os.path.join(folder, marker)):
        raise utils.UserError(f"{flag} {folder}: not {what} (no {marker} in it), so --overwrite never "
                              f"deletes it; choose another folder")


def check_package_free(folder, overwrite, query_path, train_data):
    """As `check_folder_free`; a package still waiting for its answers, in this folder or (as
    recorded under train_data) another one of the same round, gets the command that imports it: its
    images are still in the pool, so a second draw of the round would pick many of them again."""
    if (not overwrite and os.path.isfile(os.path.join(folder, MARKER))
            and not os.path.lexists(query_path)):
        raise utils.UserError(f"--export_annotation {folder} holds a package whose answers were not imported "
                              f"yet: import them first ({import_command(folder, train_data)}), or pass "
                              f"--overwrite to draw this round again")
    waiting = None if overwrite else waiting_package(train_data, os.path.basename(query_path))
    if waiting and os.path.realpath(waiting) != os.path.realpath(folder):
        raise utils.UserError(f"--export_annotation {folder}: round {os.path.basename(query_path)} has a package "
                              f"waiting for its answers in {waiting}, whose images are still in the pool: import "
                              f"it first ({import_command(waiting, train_data)}), or pass --overwrite to draw this "
                              f"round again")
    check_folder_free(folder, overwrite, MARKER, "--export_annotation", "an annotation package of data_sampling.py",
                      avoid=query_path)


def read_pending(train_data):
    """{round: package folder} as recorded under train_data; {} when there is no record or it
    cannot be read (it only guards against drawing a round twice)."""
    try:
        with open(os.path.join(train_data, PENDING), encoding="utf-8") as f:
            pending = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(r): str(f) for r, f in pending.items()} if isinstance(pending, dict) else {}


def waiting_package(train_data, round_name):
    """The package folder recorded for `round_name` when it still waits for its answers (it holds
    a package of that round and the round's query set does not exist), else None."""
    folder = read_pending(train_data).get(round_name)
    if not folder or os.path.lexists(os.path.join(train_data, round_name)):
        return None
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            return folder if json.load(f).get("round") == round_name else None
    except (OSError, ValueError, AttributeError):
        return None


def record_pending(train_data, round_name=None, folder=None, imported=None):
    """Record `folder` as the package of `round_name`, or forget the package `imported`; records
    of packages that no longer wait are dropped on the way. The file goes when none is left."""
    pending = {r: f for r, f in read_pending(train_data).items()
               if waiting_package(train_data, r) and r != round_name
               and not (imported and os.path.realpath(f) == os.path.realpath(imported))}
    if folder:
        pending[round_name] = os.path.abspath(folder)
    path = os.path.join(train_data, PENDING)
    if pending:
        atomic_io.atomic_write_text(path, json.dumps(pending, indent=1, ensure_ascii=False) + "\n")
    elif os.path.lexists(path):
        os.remove(path)


def import_command(folder, train_data, answers=None, python=None):
    """The import_annotations.py command of a package, with absolute paths (`answers`: an export)."""
    extra = ["--answers", answers] if answers else []
    return round_commands.command("import_annotations.py", ["--package", os.path.abspath(folder), "--train_data",
                                                           os.path.abspath(train_data), *extra], python=python)


def readme_text(manifest, folder, embedded):
    """README.txt of the package written to `folder`; `embedded`: its tasks.json holds the images."""
    charset = manifest["charset"]
    case = ("upper and lower case are the same word (answers are compared in lower case)" if charset["lowercase"]
            else "upper and lower case differ")
    second = sum(1 for image in manifest["images"] if image["kind"] == RELABEL)
    again = (f"\n{second} of them were labelled before and are asked again, because the model doubts their\n"
             f"label (predictions.csv marks them `relabel`); transcribe them like the others.\n") if second else ""
    studio = manifest["label_studio"]
    local = label_studio_io.LOCAL_TASKS if embedded else label_studio_io.TASKS
    if embedded:
        how = (f"Import {label_studio_io.TASKS}: its tasks hold the images themselves, so nothing else is needed\n"
               f"(no storage, no environment variables). To serve the images from this folder instead,\n"
               f"import {label_studio_io.LOCAL_TASKS} as below.")
    else:
        how = (f"The images ({studio['image_bytes']} bytes) are too large to embed in the tasks, so\n"
               f"{label_studio_io.TASKS} points at them in this folder, served as local files (below).")
    return f"""Annotation package {manifest['round']}: {len(manifest['images'])} word images to transcribe.
{again}
Each line of gt.txt is `images/<file><TAB><text>`. The text is what the model read; correct it
so that it says exactly what the image shows. Do not change the file names or the tab, and
keep one line per image.
- An image nobody can read: make its text empty or ###. It is kept out of training and never
  asked again.
- Characters the model knows: {charset['character']}
  ({case}; at most {charset['batch_max_length']} characters). An answer with another character is refused on import
  unless the importer allows it.

With Label Studio instead (docs/label-studio.md of robust-active-learning): keep one project
for all rounds, with the labeling configuration in label_config.xml.
{how}

Local files ({local}): start Label Studio with the environment variables
  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true
  LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={shlex.quote(studio['document_root'])}
(the image URLs are relative to that folder), then add to the project a Local Files source
storage with the absolute path
  {studio['storage_path']}
and do NOT sync it: a sync adds a second copy of every task, without the model's reading.
Each package needs its own storage. Then import {local}.

The readings come as predictions of the model version "{studio['model_version']}", the same in every
round. Should the project's model version be another one, choose this one (project Settings,
Prelabeling), or the readings do not show. Skip marks a task skipped; the import
counts skipped images as unreadable with --skipped unreadable. When done, export the project
as JSON (JSON_MIN and CSV are read too, but they leave skipped tasks out).

predictions.csv lists, per image, its origin, the reading, the model's confidence and the
query score. package.json is for import_annotations.py: leave it as it is.

Bringing the answers back, from gt.txt:
  {import_command(folder, manifest['train_data'])}
or from a Label Studio export (or a file,label CSV):
  {import_command(folder, manifest['train_data'], answers='EXPORT.json')}
"""


def write_package(folder, records, manifest, overwrite, query_path):
    """Write the package atomically (built in a hidden sibling, renamed into place); `records` are
    dicts with image, origin, path, reading, confidence, score, and for a second look at a labelled
    sample the kind RELABEL and the label trained on. Returns the manifest written."""
    folder = os.path.abspath(folder)
    parent, package_name = os.path.dirname(folder), os.path.basename(folder)
    os.makedirs(parent, exist_ok=True)
    staged = atomic_io.make_temp_dir(parent, package_name)
    try:
        os.makedirs(os.path.join(staged, "images"))
        taken, images, local, embedded, size = set(), [], [], [], 0
        studio = label_studio_io.setup(folder)
        for record in records:
            relpath, index = record["origin"]
            extension = image_extension(record["image"])
            name = "images/" + file_name(relpath, index, record["path"], extension, taken)
            with open(os.path.join(staged, name), "wb") as f:
                f.write(record["image"])
            entry = {"file": name, "origin": [relpath, int(index)], "path": record["path"],
                     "sha256": hashlib.sha256(record["image"]).hexdigest(), "reading": record["reading"],
                     "confidence": round(float(record["confidence"]), 6), "score": round(float(record["score"]), 6),
                     "kind": record.get("kind", QUERY)}
            if entry["kind"] == RELABEL:
                entry["label"] = record["label"]
            images.append(entry)
            url = label_studio_io.local_files_url(studio["document_root"], os.path.join(folder, name))
            local.append(label_studio_io.task(entry, url, manifest["round"]))
            size += len(record["image"])
            if size <= label_studio_io.EMBED_LIMIT:  # past it the package serves local files only
                embedded.append(label_studio_io.task(entry, label_studio_io.data_url(record["image"], extension),
                                                  manifest["round"]))
        embed = size <= label_studio_io.EMBED_LIMIT
        studio.update(image_bytes=size, tasks={label_studio_io.TASKS: "embedded" if embed else "local files",
                                               **({label_studio_io.LOCAL_TASKS: "local files"} if embed else {})})
        manifest = dict(manifest, images=images, label_studio=studio)
        with open(os.path.join(staged, "gt.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{e['file']}\t{e['reading']}\n" for e in images)
        with open(os.path.join(staged, "predictions.csv"), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["file", "origin", "path", "reading", "confidence", "score", "kind", "label"])
            for e in images:
                writer.writerow([e["file"], f"{e['origin'][0]}:{e['origin'][1]}", e["path"] or "", e["reading"],
                                 e["confidence"], e["score"], e["kind"], e.get("label", "")])
        texts = {label_studio_io.TASKS: json.dumps(embedded if embed else local, indent=1, ensure_ascii=False) + "\n",
                 "label_config.xml": label_studio_io.LABEL_CONFIG, "README.txt": readme_text(manifest, folder, embed),
                 MARKER: json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"}
        if embed:
            texts[label_studio_io.LOCAL_TASKS] = json.dumps(local, indent=1, ensure_ascii=False) + "\n"
        for name, text in texts.items():
            with open(os.path.join(staged, name), "w", encoding="utf-8") as f:
                f.write(text)
        check_package_free(folder, overwrite, query_path, manifest["train_data"])  # it may have changed meanwhile
        if os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
            os.rmdir(folder)
        if os.path.lexists(folder):
            lmdb_writing.replace_dir(staged, folder)
        else:
            os.replace(staged, folder)
    except BaseException as err:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(err, OSError):
            atomic_io.blame_output(err, folder)
        raise
    record_pending(manifest["train_data"], manifest["round"], folder)
    return manifest


# ---------------------------------------------------------------------------------------------
# reading a package and its answers


class Package:
    """A package's manifest, read and checked: `folder`, `round`, `images` (dicts in export
    order), `by_file` ({file: image dict}), the charset options, the sampling selection."""

    def __init__(self, folder):
        self.folder = folder
        path = os.path.join(folder, MARKER)
        if not os.path.isdir(folder):
            raise utils.UserError(f"--package {folder}: no such folder; give the folder data_sampling.py "
                                  f"--export_annotation wrote")
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise utils.UserError(f"--package {folder}: no {MARKER} in it; give the folder data_sampling.py "
                                  f"--export_annotation wrote") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise utils.UserError(f"{path}: not a readable manifest ({err}); export the package again") from None
        try:
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, this version reads {FORMAT}")
            self.round = str(manifest["round"])
            self.train_data = manifest["train_data"]
            self.charset = manifest["charset"]
            self.selection = manifest["selection"]
            self.query_meta = manifest["query_meta"]
            self.images = manifest["images"]
            self.by_file = {image["file"]: image for image in self.images}
            for image in self.images:
                image["origin"] = (str(image["origin"][0]), int(image["origin"][1]))
                image.setdefault("kind", QUERY)  # packages written before re-annotation could be exported
                if image["kind"] not in (QUERY, RELABEL):
                    raise ValueError(f"{image['file']} has the kind {image['kind']!r}")
                if image["kind"] == RELABEL:
                    image["label"] = str(image["label"])
            # {"name", "policy", "meta"} when the round re-annotates (data_sampling.py --relabel_ratio)
            self.relabel = manifest.get("relabel")
            # a review package (find_label_errors.py): second looks only, the relabel set named `round`
            self.review = bool(manifest.get("review"))
            if self.review and (self.of_kind(QUERY) or not self.of_kind(RELABEL)):
                raise ValueError("a review package holds second looks (kind relabel) only")
            if self.of_kind(RELABEL):
                self.relabel = {"name": str(self.relabel["name"]), "policy": str(self.relabel["policy"]),
                                "meta": dict(self.relabel["meta"])}
                if self.relabel["policy"] not in relabel_policies.POLICIES:
                    raise ValueError(f"the relabel policy {self.relabel['policy']!r} is unknown "
                                     f"(known: {relabel_policies.known()})")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise utils.UserError(f"{path}: not a manifest this version reads ({type(err).__name__}: {err}); "
                                  f"export the package again") from None
        self.manifest = manifest

    def normalise(self, label):
        return label.lower() if self.charset["lowercase"] else label

    def of_kind(self, kind):
        return [image for image in self.images if image["kind"] == kind]


class Answer:
    """One answer: the `file` it names (as `images/<file>`), its `label` (None for a task of a
    Label Studio export without one: `skipped` or unanswered), and `where` it was read (for
    messages: `gt.txt line 3`)."""

    def __init__(self, file, label, where, skipped=False):
        self.file, self.label, self.where, self.skipped = file, label, where, skipped


def as_image_file(name):
    """`images/<file>` for any of the spellings an answer may use (`<file>`, `./images/<file>`)."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name if name.startswith("images/") else "images/" + name


def locate_answers(folder, answers):
    """`(path, format)`: --answers (default the package's gt.txt) and how to read it: by its
    extension (.json, .csv, .txt/.tsv), else by its content."""
    path = answers or os.path.join(folder, "gt.txt")
    if not os.path.isfile(path):
        raise utils.UserError(f"--answers {path}: no such file; give the corrected gt.txt, a Label Studio JSON "
                              f"export or a file,label CSV")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".txt", ".tsv"):
        return path, "gt"
    text = read_text(path)
    if extension == ".json" or text.lstrip().startswith(("[", "{")):
        return path, label_studio_io.sniff(path, text)
    if extension == ".csv":
        return path, label_studio_io.sniff(path, text) or "csv"
    return path, "gt" if "\t" in text else (label_studio_io.sniff(path, text) or "csv")


def read_text(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise utils.UserError(f"--answers {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_gt(path, known):
    """gt.txt lines `images/<file><TAB>label`. A line that is only a known file name (an editor
    dropped the trailing tab of an emptied answer) is an empty answer."""
    base = os.path.basename(path)
    answers = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{base} line {number}"
        if "\t" in line:
            name, label = line.split("\t", 1)
        elif as_image_file(line) in known:
            name, label = line, ""
        else:
            raise utils.UserError(f"{where}: no tab between the file and the answer ({line[:60]!r}); write "
                                  f"`images/<file><TAB>answer`")
        answers.append(Answer(as_image_file(name), label, where))
    return answers


def parse_csv(path, known):
    """Rows `file,label`; a first row `file,label` (any case) is a header."""
    base = os.path.basename(path)
    answers = []
    rows = label_studio_io.csv_rows(csv.reader(io.StringIO(read_text(path))), path)
    for number, row in enumerate(rows, 1):
        if not row or not any(cell.strip() for cell in row):
            continue
        where = f"{base} row {number}"
        if number == 1 and [c.strip().lower() for c in row] == ["file", "label"]:
            continue
        if len(row) == 1 and as_image_file(row[0]) in known:
            row = [row[0], ""]
        if len(row) != 2:
            raise utils.UserError(f"{where}: {len(row)} columns, expected 2 (file,label); quote an answer that "
                                  f"holds a comma")
        answers.append(Answer(as_image_file(row[0]), row[1], where))
    return answers


def parse_label_studio(path, fmt, several, round_name=None):
    """The answers of a Label Studio export (JSON, JSON_MIN or CSV) to the tasks of `round_name`
    (a project holds every round's) and the warnings to print. Per task its answer; of several
    different answers the latest, `unreadable` or a UserError (`several`: --several_answers), with
    a warning; a task without an answer (skipped or not) gives an Answer without label; an answer
    of several lines is joined by a space, with a warning."""
    answers, warnings = [], []
    export = label_studio_io.read_export(path, read_text(path), fmt, round_name)
    if export.other_rounds:
        rounds = ", ".join(f"{n} of {r}" for r, n in sorted(export.other_rounds.items()))
        warnings.append(f"{os.path.basename(path)}: left aside the tasks of other rounds in the project ({rounds})")
    for entry in export.values():
        file = as_image_file(entry.file)
        if not entry.answers:  # skipped or unanswered: no label, reported as missing unless --skipped unreadable
            answers.append(Answer(file, None, entry.where, skipped=bool(entry.skipped)))
            continue
        texts = [text for text, _ in entry.answers]
        label, lines = entry.answers[-1]
        if len(set(texts)) > 1:
            listed = ", ".join(repr(t) for t in texts)
            if several == "refuse":
                raise utils.UserError(f"{entry.where}: {len(texts)} different answers ({listed}); keep one in Label "
                                      f"Studio, or pass --several_answers latest or unreadable")
            if several == "unreadable":
                label, lines = "", 0
                warnings.append(f"{entry.where}: {len(texts)} different answers ({listed}); counted unreadable "
                                f"(--several_answers unreadable)")
            else:
                warnings.append(f"{entry.where}: {len(texts)} different answers ({listed}, oldest first); the latest, "
                                f"{label!r}, is taken (--several_answers refuse or unreadable to decide otherwise)")
        if lines > 1:
            warnings.append(f"{entry.where}: an answer of {lines} lines, joined by a space into {label!r}")
        answers.append(Answer(file, label, entry.where))
    return answers, warnings


PARSERS = {"gt": parse_gt, "csv": parse_csv}


def read_answers(package, path, fmt, several="latest"):
    """`(answers, warnings)` of the answer file `path` in the format `fmt` (locate_answers')."""
    if fmt in label_studio_io.FORMATS:
        return parse_label_studio(path, fmt, several, package.round)
    return PARSERS[fmt](path, package.by_file), []


# ---------------------------------------------------------------------------------------------
# judging the answers


class Judged:
    """Per exported image (export order): `label` (None when unreadable) and `status`
    (unchanged / changed / unreadable, against the model's reading); counts of each and of unknown
    characters."""

    def __init__(self, package, decisions, unknown):
        self.package = package
        self.decisions = decisions  # [(image dict, label or None, status)]
        self.unknown = unknown  # [(where, label, characters, file)]
        self.counts = {s: sum(1 for _, _, st in decisions if st == s) for s in ("unchanged", "changed", "unreadable")}
        self.too_long = sum(1 for _, label, _ in decisions
                            if label is not None and len(label) > package.charset["batch_max_length"])

    def of_kind(self, kind):
        """The answers to the images of one kind (QUERY or RELABEL) alone."""
        files = {image["file"] for image in self.package.of_kind(kind)}
        return Judged(self.package, [d for d in self.decisions if d[0]["file"] in files],
                      [u for u in self.unknown if u[3] in files])


def judge(package, answers, source, allow_unknown=False, skipped="missing", fmt=None):
    """Check that every exported image has exactly one answer and that no answer names another
    file; sort the answers into unchanged, changed and unreadable. An answer with characters
    outside the recorded charset is a UserError unless `allow_unknown`. A task skipped in Label
    Studio is unreadable with `skipped` "unreadable", else missing like an unanswered one; the
    message names every image without an answer and says why (`fmt`: the export's format)."""
    seen = {}
    for answer in answers:
        if answer.file not in package.by_file:
            raise utils.UserError(f"{answer.where}: names no exported image ({answer.file}); answer only the "
                                  f"images of {package.folder}/images")
        if answer.file in seen:
            raise utils.UserError(f"{answer.where}: a second answer for {answer.file} (the first: "
                                  f"{seen[answer.file].where}); keep one")
        seen[answer.file] = answer
    labels = {file: "" if answer.skipped and skipped == "unreadable" else answer.label for file, answer in seen.items()}
    missing = [image["file"] for image in package.images if labels.get(image["file"]) is None]
    if missing:
        raise utils.UserError(missing_message(missing, seen, source, fmt))
    charset = set(package.charset["character"])
    decisions, unknown = [], []
    for image in package.images:
        answer = seen[image["file"]]
        label = labels[image["file"]].strip()
        if label in ("", UNREADABLE_MARK):
            decisions.append((image, None, "unreadable"))
            continue
        outside = sorted(set(package.normalise(label)) - charset)
        if outside:
            if not allow_unknown:
                raise utils.UserError(f"{answer.where}: {label!r} holds characters the model does not know "
                                      f"({''.join(outside)!r}); correct it, write {UNREADABLE_MARK} for an unreadable "
                                      f"image, or pass --allow_unknown_characters to keep it (training's label filter "
                                      f"then leaves it out)")
            unknown.append((answer.where, label, "".join(outside), image["file"]))
        status = "unchanged" if package.normalise(label) == package.normalise(image["reading"]) else "changed"
        decisions.append((image, label, status))
    return Judged(package, decisions, unknown)


def missing_message(missing, seen, source, fmt):
    """The error for images without an answer: each named, with why (skipped, unanswered, not in
    the export), and what would fix it."""
    def why(file):
        answer = seen.get(file)
        if answer is None:
            return "not in the export: skipped?" if fmt in label_studio_io.FORMATS else ""
        return "skipped" if answer.skipped else "unanswered"
    reasons = [why(file) for file in missing]
    listed = ", ".join(f"{file} ({reason})" if reason else file for file, reason in zip(missing, reasons))
    fixes = []
    if "skipped" in reasons:
        fixes.append("pass --skipped unreadable to count skipped tasks as unreadable")
    if "unanswered" in reasons:
        fixes.append("answer the unanswered tasks in Label Studio and export again")
    if "not in the export: skipped?" in reasons:
        fixes.append("JSON_MIN and CSV exports leave skipped tasks out: export the project as JSON to import them "
                     "with --skipped unreadable" if fmt != "label_studio" else "export the project with all its tasks")
    if not fmt or fmt not in label_studio_io.FORMATS:
        fixes.append(f"every exported image needs one (empty or {UNREADABLE_MARK} for an image that cannot be read)")
    count = f"{len(missing)} images" if len(missing) > 1 else "1 image"
    return f"{source}: no answer for {count}: {listed}; {'; '.join(fixes)}"


# ---------------------------------------------------------------------------------------------
# writing the query set


def check_origins(package, root, replaced):
    """The datasets the images came from are under root, each holds the very image exported (by
    its hash), and no new image was queried since the export (by another round or import)."""
    for relpath in sorted({image["origin"][0] for image in package.images}):
        if not os.path.isfile(os.path.join(root, relpath, "data.mdb")):
            raise utils.UserError(f"--train_data {root}: no dataset {relpath}, which the package's images come "
                                  f"from; give the root it was drawn from ({package.train_data})")
    identities = [image["origin"] for image in package.images]
    for image, (data, _) in zip(package.images, read_images(root, identities)):
        if hashlib.sha256(data).hexdigest() != image["sha256"]:
            relpath, index = image["origin"]
            raise utils.UserError(f"--train_data {root}: sample {index} of {relpath} is not the image exported as "
                                  f"{image['file']}; give the root the package was drawn from ({package.train_data})")
    new = {image["origin"] for image in package.of_kind(QUERY)}
    taken = set_records.read_query_origins(root, skip={replaced} if replaced else ()) & new
    if taken:
        relpath, index = sorted(taken)[0]
        raise utils.UserError(f"{len(taken)} of the package's images were queried since it was exported (e.g. "
                              f"sample {index} of {relpath}); nothing was written")


def next_selection(package, root, name, trainable, relabel_set=None):
    """`(select_data, batch_ratio)` strings for the next `train.py --mode al`: the sampling
    round's selection without the unlabelled names and those of empty query sets (nothing of them
    trains), plus every query set under root that holds a sample, the new one last (left out when it
    holds no trainable sample), then every relabel set under root with the share 0 (`relabel_set`,
    the one this import writes, last)."""
    selection = package.selection
    leaves = query_sets.list_leaf_lmdbs(root)
    relabels = [rel.rsplit("/", 1)[-1] for rel in set_records.relabel_order(root, set_records.relabel_leaves(root, leaves))]
    relabels = [n for n in relabels if n != relabel_set] + ([relabel_set] if relabel_set else [])
    drop = set(selection.get("unlabelled") or []) | query_sets.empty_names(selection["select_data"], leaves, root)
    drop |= set(relabels)
    kept = [(n, float(r)) for n, r in zip(selection["select_data"], selection["batch_ratio"]) if n not in drop]
    names = [n for n, _ in kept]
    others = [n for n in query_sets.query_set_names(names, leaves, root) if n != name]
    others += [n for n in query_sets.unselected_query_sets(leaves, names, root) if n != name and n not in others]
    ratios = [r for _, r in kept]
    if trainable:
        others.append(name)
    if not others:  # nothing queried to train on: the base selection as it was
        chosen, shares = names, ratios
    else:
        chosen, shares = query_strategies.next_round_selection(names, ratios, others[:-1], others[-1])
    if not chosen:
        return "", ""
    return query_strategies.format_selection(list(chosen) + relabels, list(shares) + [0.0] * len(relabels))


def import_meta(package, judged, name, answers_path, fmt):
    """The query set's `query-meta`; `judged` holds the answers to the new images (QUERY)."""
    meta = dict(package.query_meta)
    trainable = [image for image, label, _ in judged.decisions if label is not None]
    meta.update({
        "name": name, "num_picked": len(trainable), "scores": [image["score"] for image in trainable],
        "annotation": answers_record(package, judged, answers_path, fmt),
    })
    return meta


def answers_record(package, judged, answers_path, fmt):
    return {"package": os.path.abspath(package.folder), "answers": os.path.abspath(answers_path), "format": fmt,
            **judged.counts, "unknown_characters": len(judged.unknown),
            "imported": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def second_looks(package, judged):
    """Per answer to a second look (RELABEL): `confirmed` (the label trained on, again), `changed`
    (another label) or `unreadable`, comparing as training does (case folded when it folds)."""
    outcomes = []
    for image, label, _ in judged.decisions:
        if label is None:
            outcomes.append("unreadable")
        else:
            same = package.normalise(label) == package.normalise(image["label"])
            outcomes.append("confirmed" if same else "changed")
    return outcomes


def relabel_summary(package, judged, path):
    """The import summary's `relabel` entry: the relabel set, its policy and what the second looks
    did. `dropped` counts the samples that leave training: unreadable, and with the policy `agree`
    also those whose two answers differ."""
    outcomes = second_looks(package, judged)
    counts = {kind: outcomes.count(kind) for kind in OUTCOMES}
    policy = package.relabel["policy"]
    differing = relabel_policies.decide(policy, "first answer", "second answer")  # what the policy does then
    return {"relabel_set": os.path.basename(path), "path": os.path.abspath(path), "policy": policy,
            "num_relabelled": len(outcomes), **counts,
            "dropped": counts["unreadable"] + (counts["changed"] if differing == relabel_policies.DROP else 0),
            "changes": [{"file": image["file"], "label": image["label"], "answer": label}
                        for (image, label, _), outcome in zip(judged.decisions, outcomes) if outcome == "changed"]}


def import_summary(package, judged, name, path, root, answers_path, fmt, relabel_path=None):
    """The summary of an import; `judged` holds every answer, `relabel_path` is where the relabel
    set goes when the package asked for second looks."""
    relabelled = judged.of_kind(RELABEL)
    judged = judged.of_kind(QUERY)
    trainable = judged.counts["unchanged"] + judged.counts["changed"]
    select_data, batch_ratio = next_selection(package, root, name, trainable,
                                              os.path.basename(relabel_path) if relabel_path else None)
    summary = {
        "query_set": name, "path": os.path.abspath(path), "package": os.path.abspath(package.folder),
        "answers": os.path.abspath(answers_path), "format": fmt, "strategy": package.query_meta.get("strategy"),
        "num_answers": len(judged.decisions), "num_picked": trainable, **judged.counts,
        "unknown_characters": len(judged.unknown), "too_long": judged.too_long,
        # the model's word accuracy on the picked images, as the transcribers judged it
        "accuracy": {"picked": judged.counts["unchanged"] / trainable if trainable else None, "pool": None},
        "changes": [{"file": image["file"], "reading": image["reading"], "answer": label}
                    for image, label, status in judged.decisions if status == "changed"],
        "next_select_data": select_data, "next_batch_ratio": batch_ratio,
        "next_commands": round_commands.commands(package.manifest, name, select_data, batch_ratio),
    }
    if relabel_path:
        summary["relabel"] = relabel_summary(package, relabelled, relabel_path)
    return summary


def format_import_summary(summary):
    counts = (f"{summary['unchanged']} as the model read them, {summary['changed']} corrected, "
              f"{summary['unreadable']} unreadable (kept out of training, never asked again)")
    lines = [f"imported {summary['num_answers']} answers from {summary['answers']} ({ANSWER_FORMATS[summary['format']]}) "
             f"-> {summary['path']}",
             f"  {counts}",
             f"  {summary['num_picked']} samples to train on; {summary['unknown_characters']} with characters "
             f"outside the charset, {summary['too_long']} longer than --batch_max_length (training's filter drops "
             f"both)"]
    part = summary.get("relabel")
    if part:
        lines.append(f"second looks: {part['num_relabelled']} labelled samples -> {part['path']} (policy "
                     f"{part['policy']}): {part['confirmed']} confirmed, {part['changed']} changed, "
                     f"{part['unreadable']} unreadable; {part['dropped']} leave training")
    if summary["next_select_data"]:
        lines.append(f"next round: train.py --mode al --select_data {summary['next_select_data']} "
                     f"--batch_ratio {summary['next_batch_ratio']}")
        commands = summary.get("next_commands") or {}
        if commands:
            lines += ["  train it (the settings of the round that trained the sampling model; change --num_iter or "
                      "--calibrator where the loop's rounds differ):", f"    {commands['train']}",
                      "  then sample and export the round after it:", f"    {commands['sampling']}"]
        else:
            lines.append("  (no opt.yaml beside the sampling model records its settings: add the architecture and "
                         "training flags of the last round)")
    if summary["num_answers"] and not summary["num_picked"]:
        lines.append("warning: no answer is readable, so the query set holds no sample to train on; it only keeps "
                     "these images out of later pools (no next round's selection names it; train.py skips it)")
    return "\n".join(lines)


def review_selection(package, root, name):
    """`(select_data, batch_ratio)` strings for training after a review: the selection it judged
    with training's shares (when find_label_errors.py was given --batch_ratio), relabel sets left
    out, then every relabel set under root at the share 0, this one last; (None, None) without the
    shares."""
    shares = package.selection.get("batch_ratio")
    if shares is None:
        return None, None
    leaves = query_sets.list_leaf_lmdbs(root)
    relabels = [rel.rsplit("/", 1)[-1] for rel in set_records.relabel_order(root, set_records.relabel_leaves(root, leaves))]
    relabels = [n for n in relabels if n != name] + [name]
    kept = [(n, float(r)) for n, r in zip(package.selection["select_data"], shares) if n not in relabels]
    return query_strategies.format_selection([n for n, _ in kept] + relabels,
                                             [r for _, r in kept] + [0.0] * len(relabels))


def review_summary(package, judged, path, root, answers_path, fmt):
    """The summary of a review package's import (find_label_errors.py --export_annotation)."""
    name = os.path.basename(path)
    select_data, batch_ratio = review_selection(package, root, name)
    return {"review": name, "path": os.path.abspath(path), "package": os.path.abspath(package.folder),
            "answers": os.path.abspath(answers_path), "format": fmt, "num_answers": len(judged.decisions),
            "unknown_characters": len(judged.unknown), "too_long": judged.too_long,
            "relabel": relabel_summary(package, judged, path),
            "next_select_data": select_data, "next_batch_ratio": batch_ratio}


def format_review_summary(summary):
    part = summary["relabel"]
    lines = [f"imported {summary['num_answers']} second looks from {summary['answers']} "
             f"({ANSWER_FORMATS[summary['format']]}) -> {summary['path']} (policy {part['policy']})",
             f"  {part['confirmed']} confirmed, {part['changed']} changed, {part['unreadable']} unreadable; "
             f"{part['dropped']} leave training; {summary['unknown_characters']} with characters outside the charset, "
             f"{summary['too_long']} longer than --batch_max_length (training's label filter ignores those answers)"]
    if summary["next_select_data"]:
        lines.append(f"next training: train.py --select_data {summary['next_select_data']} "
                     f"--batch_ratio {summary['next_batch_ratio']}")
    else:
        lines.append(f"next training: add {summary['review']} to --select_data with the share 0 in --batch_ratio")
    return "\n".join(lines)


def unreadable_keys(origins):
    """The `unreadable-%09d` keys and their count, as a query set or relabel set stores them."""
    extra = {lmdb_format.unreadable_key(k): f"{rel}\t{index}".encode("utf-8") for k, (rel, index) in enumerate(origins, 1)}
    extra[lmdb_format.NUM_UNREADABLE_KEY] = str(len(origins)).encode()
    return extra


def write_relabel_set(path, judged, root, package, query_set, answers_path, fmt, replace):
    """The relabel set of the second looks (`judged`: the RELABEL answers): each readable answer
    with the image's bytes and its identity as origin, the unreadable ones as `unreadable-%09d`
    origins (dataset.read_relabels drops those samples), and the `relabel-meta` that the export
    recorded, completed by the import; one atomic write."""
    answered = [(image, label) for image, label, _ in judged.decisions if label is not None]
    unreadable = [image["origin"] for image, label, _ in judged.decisions if label is None]
    images = read_images(root, [image["origin"] for image, _ in answered])
    samples = ((data, label, image["origin"]) for (image, label), (data, _) in zip(answered, images))
    record = answers_record(package, judged, answers_path, fmt)
    outcomes = second_looks(package, judged)
    record.update({kind: outcomes.count(kind) for kind in OUTCOMES})
    meta = dict(package.relabel["meta"], name=os.path.basename(path), query_set=query_set,
                num_relabelled=len(judged.decisions), annotation=record)
    return lmdb_writing.write_lmdb(path, samples, meta=meta, overwrite=replace, extra_keys=unreadable_keys(unreadable),
                                   meta_key=lmdb_format.RELABEL_META_KEY)


def write_query_set(path, judged, root, meta, summary, replace):
    """The query set: the trainable answers with the images' bytes from their source LMDBs and
    their origins, the unreadable ones as `unreadable-%09d` origins, `query-meta` and summary.json,
    all in one atomic write."""
    trainable = [(image, label) for image, label, _ in judged.decisions if label is not None]
    unreadable = [image["origin"] for image, label, _ in judged.decisions if label is None]
    images = read_images(root, [image["origin"] for image, _ in trainable])
    samples = ((data, label, image["origin"]) for (image, label), (data, _) in zip(trainable, images))
    return lmdb_writing.write_lmdb(path, samples, meta=meta, overwrite=replace, extra_keys=unreadable_keys(unreadable),
                                   extra_files={"summary.json": json.dumps(summary, indent=2, ensure_ascii=False) + "\n"})
