"""The annotation round trip through a real Label Studio (`make labelstudio-check`; opt-in, not part
of `make test`: it installs Label Studio and takes minutes).

Builds --venv with the pinned label-studio (and sentry-sdk<3) when it is missing, renders small
synthetic LMDBs and a tiny model in a temporary folder, starts Label Studio on 127.0.0.1 with a
throw-away data directory, and drives the loop through the HTTP API as a team would:

  round 1  data_sampling.py --export_annotation into a folder named `round 1 #b&c`; a project from
           the package's label_config.xml; tasks-local-files.json imported; a Local Files storage
           added (absolute path, never synced); every image URL must return the package's bytes and
           every task must come with its reading from the labelling queue; the tasks answered (kept,
           corrected, with a space, upper case, two lines, two annotations, ###, empty, one skipped,
           one left unanswered); exported as JSON, JSON_MIN and CSV, each import refused naming the
           unanswered and the skipped image; answered completely; the three exports must import to
           the same labels; the JSON import written and its query set checked (labels, bytes, origins)
  round 2  the train.py and data_sampling.py commands the import printed, run as printed; the new
           package's tasks.json (images embedded) imported into the same project; the queue must
           still pre-fill every task; answered, exported, imported and checked

It stops the server it started by its process id (also on failure), prints what it verified and
how long each step took, and exits 0 only when everything held. --record DIR keeps round 1's first
exports and its manifest as test data (tests/data/labelstudio)."""
import argparse
import base64
import http.cookiejar
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import yaml  # noqa: E402

from data_layer import lmdb_format  # noqa: E402  (the repo root is on sys.path only from here)
from annotators import label_studio_io  # noqa: E402
from model import Model, save_weights  # noqa: E402

VERSION = "1.23.2"
REQUIREMENTS = [f"label-studio=={VERSION}", "sentry-sdk<3"]  # 1.23.2 pulls sentry-sdk 3, with which it dies on start
QUIET_ENV = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "LATEST_VERSION_CHECK": "false",
             "COLLECT_ANALYTICS": "false"}  # nothing leaves the machine
ARCH = {"Transformation": "None", "FeatureExtraction": "VGG", "SequenceModeling": "None", "Prediction": "CTC",
        "output_channel": 32, "hidden_size": 16, "num_fiducial": 20, "input_channel": 1, "imgH": 32, "imgW": 100,
        "rgb": False, "PAD": False, "batch_max_length": 25, "sensitive": False,
        "character": "0123456789abcdefghijklmnopqrstuvwxyz"}
# round 0's settings, as train.py would have saved them; paths relative to the folder it ran in
TRAINING = {"valid_data": "root/valid_data_lmdb", "total_data_usage_ratio": 0.5, "manualSeed": 1111,
            "batch_size": 16, "workers": 0, "num_iter": 10, "valInterval": 5, "adam": True, "lr": 1e-5,
            "calibrator": "CE", "output_dir": "models", "exp_name": "round0", "no_progress": True, "threads": 1,
            "device": "cpu"}
ROUND1_FOLDER = "annotation/round 1 #b&c"  # a space, # and &: the image URLs must be percent-encoded
NUM_QUERY = 10
# how round 1's tasks are answered, by their place in the labelling queue
PLAN = ["keep", "correct", "skip", "space", "two annotations", "two lines", "###", "empty", "upper", "unanswered"]


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)
    print(f"  ok: {message}")


class Steps:
    """Times each step; prints them at the end."""

    def __init__(self):
        self.times, self.start = [], time.time()

    def run(self, name):
        steps = self

        class Step:
            def __enter__(self):
                print(f"== {name}", flush=True)
                self.t = time.time()

            def __exit__(self, *exc):
                steps.times.append((name, time.time() - self.t))
        return Step()

    def report(self):
        print("\ntimings:")
        for name, seconds in self.times:
            print(f"  {seconds:7.1f} s  {name}")
        print(f"  {time.time() - self.start:7.1f} s  total")


# ---------------------------------------------------------------------------------------------
# Label Studio: install, start, stop, HTTP


def ensure_venv(venv):
    studio = os.path.join(venv, "bin", "label-studio")
    if not os.path.isfile(studio):
        print(f"installing {' '.join(REQUIREMENTS)} into {venv} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "--quiet", *REQUIREMENTS], check=True)
    found = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "import label_studio, sentry_sdk; print(label_studio.__version__, sentry_sdk.VERSION)"],
                           check=True, capture_output=True, text=True, cwd=venv).stdout.split()
    check(found[0] == VERSION and int(found[1].split(".")[0]) < 3,
          f"{venv}: label-studio {found[0]}, sentry-sdk {found[1]}")
    return studio


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port):
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(socket.inet_ntop(socket.AF_INET if len(address) == 8 else socket.AF_INET6,
                                              bytes.fromhex(address)[::-1] if len(address) == 8
                                              else b"".join(bytes.fromhex(address[i:i + 8])[::-1]
                                                            for i in range(0, 32, 8))))
    return found


def start_server(studio, data_dir, document_root, port, email, password, log_path):
    env = dict(os.environ, **QUIET_ENV, LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=document_root)
    with open(log_path, "w") as log:
        # its own session, so that stopping it reaches whatever it starts, and nothing else
        return subprocess.Popen([studio, "start", "--internal-host", "127.0.0.1", "--port", str(port), "--data-dir",
                                 data_dir, "--no-browser", "--username", email, "--password", password],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(process):
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Client:
    """Label Studio's HTTP API with a personal access token (legacy tokens are off by default)."""

    def __init__(self, base):
        self.base, self.access = base, None

    def wait(self, process, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if process.poll() is not None:
                raise CheckFailed(f"label-studio exited with status {process.returncode} while starting")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise CheckFailed(f"label-studio did not answer within {timeout} s")

    def personal_token(self, email, password):
        """Log in as the user (a session, as the web page does), create their personal access
        token, and exchange it for an access token."""
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = opener.open(self.base + "/user/login/").read().decode()
        form = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        opener.open(urllib.request.Request(
            self.base + "/user/login/", headers={"Referer": self.base + "/user/login/"},
            data=urllib.parse.urlencode({"csrfmiddlewaretoken": form, "email": email, "password": password}).encode()))
        csrf = next(c.value for c in jar if c.name == "csrftoken")
        reply = opener.open(urllib.request.Request(
            self.base + "/api/token/", data=b"{}", method="POST",
            headers={"X-CSRFToken": csrf, "Content-Type": "application/json", "Referer": self.base + "/"}))
        self.token = json.loads(reply.read())["token"]
        self.refresh()

    def refresh(self):
        reply = urllib.request.urlopen(urllib.request.Request(
            self.base + "/api/token/refresh/", data=json.dumps({"refresh": self.token}).encode(),
            headers={"Content-Type": "application/json"}))
        self.access = json.loads(reply.read())["access"]

    def call(self, method, path, body=None, raw=False, expect=(200, 201), header=None):
        for attempt in (1, 2):
            request = urllib.request.Request(
                self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": header or f"Bearer {self.access}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=600) as reply:
                    status, content = reply.status, reply.read()
            except urllib.error.HTTPError as err:
                status, content = err.code, err.read()
            if status == 401 and attempt == 1 and header is None:  # access tokens live minutes
                self.refresh()
                continue
            break
        if expect and status not in expect:
            raise CheckFailed(f"{method} {path}: HTTP {status} {content[:300]!r}")
        return status, content if raw else (json.loads(content) if content else None)

    def tasks(self, project):
        _, reply = self.call("GET", f"/api/tasks?project={project}&page_size=10000")
        return reply["tasks"] if isinstance(reply, dict) else reply

    def answer(self, task_id, texts, cancelled=False):
        result = [] if texts is None else [{"from_name": label_studio_io.FROM_NAME, "to_name": label_studio_io.TO_NAME,
                                            "type": "textarea", "value": {"text": texts}}]
        self.call("POST", f"/api/tasks/{task_id}/annotations",
                  {"result": result, "was_cancelled": cancelled, "lead_time": 2.0})

    def export(self, project, kind):
        _, content = self.call("GET", f"/api/projects/{project}/export?exportType={kind}&download_all_tasks=true",
                               raw=True)
        return content


# ---------------------------------------------------------------------------------------------
# the project's side


def run(words, env=None, expect=0):
    """A command of this project; its output (stdout and stderr together) and status."""
    done = subprocess.run(words, capture_output=True, text=True, env=dict(os.environ, **(env or {})), cwd=WORK)
    output = done.stdout + done.stderr
    if expect is not None and done.returncode != expect:
        raise CheckFailed(f"{' '.join(shlex.quote(w) for w in words)} exited {done.returncode}, not {expect}:\n"
                          f"{output[-2000:]}")
    return output, done.returncode


def make_model(folder):
    """Round 0's model: random weights whose output layer is scaled up so that it reads some
    characters (a trained tiny model reads nothing yet), with the opt.yaml train.py would save."""
    torch.manual_seed(0)
    model = Model(types.SimpleNamespace(**ARCH, num_class=len(ARCH["character"]) + 1))
    with torch.no_grad():
        for param in model.Prediction.parameters():
            param.mul_(300.0)
    os.makedirs(folder)
    save_weights(model, os.path.join(folder, "best_accuracy.pth"))
    with open(os.path.join(folder, "opt.yaml"), "w") as f:
        yaml.safe_dump(dict(ARCH, **TRAINING, num_class=len(ARCH["character"]) + 1, mode="base"), f)
    return os.path.join(folder, "best_accuracy.pth")


def source(train, origin):
    """(image bytes, label) of a sample of the training root."""
    relpath, index = origin
    with lmdb_format.shared_env(os.path.join(train, relpath)).begin(write=False) as txn:
        return txn.get(b"image-%09d" % index), txn.get(b"label-%09d" % index).decode()


def read_query_set(path):
    with lmdb_format.shared_env(path).begin(write=False) as txn:
        count = int(txn.get(b"num-samples"))
        return [(txn.get(b"image-%09d" % k), txn.get(b"label-%09d" % k).decode(),
                 txn.get(b"origin-%09d" % k).decode()) for k in range(1, count + 1)]


def image_bytes(client, url):
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    status, content = client.call("GET", url, raw=True, expect=None)
    return content if status == 200 else None


def import_answers(package, train, answers, *flags, expect=0):
    return run([sys.executable, os.path.join(REPO, "import_annotations.py"), "--package", package, "--train_data",
                train, "--answers", answers, *flags], expect=expect)


def error_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def walk_queue(client, project, package, files, answer):
    """Walk the labelling queue (/next) over the tasks of `files`, as a transcriber does: each task
    must come with its reading pre-filled as a prediction; `answer(task id, image dict, place)`
    answers it (or not). Stops when the queue is empty or gives a task a second time (the one
    left unanswered). Returns [(task id, image dict)] in queue order."""
    by_file = {image["file"]: image for image in package["images"]}
    order, seen = [], set()
    while True:
        status, task = client.call("GET", f"/api/projects/{project}/next", expect=(200, 404))
        if status == 404 or task["id"] in seen:
            return order
        if task["data"]["file"] not in files:
            raise CheckFailed(f"/next gave task {task['id']} ({task['data']['file']}) of another round")
        image = by_file[task["data"]["file"]]
        texts = [r["value"]["text"] for p in task.get("predictions") or [] for r in p["result"]]
        if texts != ([[image["reading"]]] if image["reading"] else []):
            raise CheckFailed(f"/next task {task['id']} ({image['file']}): predictions {task.get('predictions')!r}, "
                              f"expected the reading {image['reading']!r} pre-filled")
        seen.add(task["id"])
        order.append((task["id"], image))
        answer(task["id"], image, len(order) - 1)


def load_package(folder):
    with open(os.path.join(folder, "package.json"), encoding="utf-8") as f:
        return json.load(f)


def check_images(client, project, package, folder, files):
    """Every task of `files` shows the package's image, byte for byte."""
    tasks = [t for t in client.tasks(project) if t["data"]["file"] in files]
    same = 0
    for t in tasks:
        with open(os.path.join(folder, t["data"]["file"]), "rb") as f:
            same += image_bytes(client, t["data"]["image"]) == f.read()
    url = tasks[0]["data"]["image"] if tasks else ""
    kind = "data URLs" if url.startswith("data:") else f"local-files URLs, e.g. {url[:70]}"
    check(len(tasks) == len(files) and same == len(tasks), f"{same} of {len(files)} images ({kind}) are the package's "
                                                           f"bytes")
    return tasks


def half(word):
    return max(1, len(word) // 2)


def submissions(step, truth, reading):
    """The annotations a plan step submits: each a list of textarea lines."""
    head, tail = truth[:half(truth)], truth[half(truth):]
    return {"keep": [[reading]], "correct": [[truth]], "space": [[f"{truth} {truth}"]],
            "two annotations": [["wtwxwxtx london"], [truth]], "two lines": [[f"{head}\n{tail}"]],
            "###": [["###"]], "empty": [[""]], "upper": [[truth.upper()]], "skip": [], "unanswered": []}[step]


def expected_label(step, truth, reading):
    """The label the import must write for a plan step (None: unreadable, or no answer yet)."""
    head, tail = truth[:half(truth)], truth[half(truth):]
    return {"keep": reading, "correct": truth, "space": f"{truth} {truth}", "two annotations": truth,
            "two lines": f"{head} {tail}".strip(), "###": None, "empty": None, "upper": truth.upper(),
            "skip": None, "unanswered": None}[step] or None


def export_all(client, project, folder, stem):
    paths = {}
    for kind, extension in (("JSON", ".json"), ("JSON_MIN", ".min.json"), ("CSV", ".csv")):
        paths[kind] = os.path.join(folder, stem + extension)
        with open(paths[kind], "wb") as f:
            f.write(client.export(project, kind))
    print(f"  exported {', '.join(f'{k} ({os.path.getsize(p)} bytes)' for k, p in paths.items())}")
    return paths


def parse_summary(output):
    """The import's counts line, for comparing imports."""
    return [line.strip() for line in output.splitlines() if "as the model read them" in line]


def steps_round1(steps, client, folder, train, opt):
    package = load_package(folder)
    files = {image["file"] for image in package["images"]}
    exports = os.path.join(WORK, "exports")
    os.makedirs(exports)
    with steps.run("round 1: project, tasks-local-files.json, Local Files storage (not synced)"):
        with open(os.path.join(folder, "label_config.xml"), encoding="utf-8") as f:
            _, project = client.call("POST", "/api/projects", {"title": "transcription", "label_config": f.read()})
        project = project["id"]
        with open(os.path.join(folder, label_studio_io.LOCAL_TASKS), encoding="utf-8") as f:
            _, reply = client.call("POST", f"/api/projects/{project}/import", json.load(f))
        check(reply["task_count"] == NUM_QUERY and reply["prediction_count"] == NUM_QUERY,
              f"imported {reply['task_count']} tasks with {reply['prediction_count']} predictions")
        status, reply = client.call("POST", "/api/storages/localfiles", expect=None, body={
            "project": project, "path": os.path.relpath(os.path.join(folder, "images"), WORK), "title": "relative"})
        check(status == 400, f"a relative storage path is refused ({status}: {str(reply)[150:260]}...)")
        storage = package["label_studio"]["storage_path"]
        client.call("POST", "/api/storages/localfiles", {"project": project, "path": storage, "title": "round 1",
                                                         "use_blob_urls": True})
        print(f"  added the storage {storage} (no sync)")
        _, info = client.call("GET", f"/api/projects/{project}")
        check(info["model_version"] == label_studio_io.MODEL_VERSION,
              f"the project's model version is {info['model_version']!r}")
        check(len(client.tasks(project)) == NUM_QUERY, f"the project holds {NUM_QUERY} tasks (nothing synced)")
        check_images(client, project, package, folder, files)

    truths, readings, places = {}, {}, {}

    def answer(task_id, image, k):
        places[k] = (task_id, image)
        truths[k], readings[k] = source(train, tuple(image["origin"]))[1].lower(), image["reading"]
        if PLAN[k] == "skip":
            client.answer(task_id, None, cancelled=True)
        for submitted in submissions(PLAN[k], truths[k], readings[k]):
            client.answer(task_id, submitted)

    with steps.run("round 1: the labelling queue, pre-filled, answered"):
        order = walk_queue(client, project, package, files, answer)
        check(len(order) == NUM_QUERY, f"the queue gave all {NUM_QUERY} tasks, each with the model's reading "
                                       f"pre-filled ({sum(1 for _, i in order if i['reading'])} non-empty readings)")
        print("  answers by queue place: " + ", ".join(f"{k}:{step}" for k, step in enumerate(PLAN)))
    labels = {k: expected_label(step, truths[k], readings[k]) for k, step in enumerate(PLAN)}
    by_plan = {step: places[k][1]["file"] for k, step in enumerate(PLAN)}

    with steps.run("round 1: exports with a skipped and an unanswered task, each import refused"):
        first = export_all(client, project, exports, "round1-partial")
        for kind, path in first.items():
            output, _ = import_answers(folder, train, path, "--dry_run", expect=2)
            line = error_line(output)
            wanted = [f"{by_plan['unanswered']} (unanswered)",
                      f"{by_plan['skip']} (skipped)" if kind == "JSON" else f"{by_plan['skip']} (not in the export"]
            check(line.startswith("error: ") and all(w in line for w in wanted),
                  f"{kind} refused: ...{line[line.find(' no answer for '):]}")
        if opt.record:
            os.makedirs(opt.record, exist_ok=True)
            names = {"JSON": "export.json", "JSON_MIN": "export-min.json", "CSV": "export.csv"}
            for kind, path in first.items():
                shutil.copyfile(path, os.path.join(opt.record, names[kind]))
            shutil.copyfile(os.path.join(folder, "package.json"), os.path.join(opt.record, "package.json"))
            with open(os.path.join(opt.record, "plan.json"), "w", encoding="utf-8") as f:
                json.dump({"files": by_plan, "labels": {places[k][1]["file"]: labels[k] for k in labels},
                           "submitted": {places[k][1]["file"]: submissions(step, truths[k], readings[k])
                                         for k, step in enumerate(PLAN)}}, f, indent=1, ensure_ascii=False)
            print(f"  recorded {', '.join(sorted(os.listdir(opt.record)))} in {opt.record}")

    with steps.run("round 1: the unanswered task answered; JSON imports with --skipped unreadable"):
        unanswered_id = places[PLAN.index("unanswered")][0]
        labels[PLAN.index("unanswered")] = truths[PLAN.index("unanswered")]
        client.answer(unanswered_id, [labels[PLAN.index("unanswered")]])
        second = export_all(client, project, exports, "round1-answered")
        output, _ = import_answers(folder, train, second["JSON"], "--dry_run", "--skipped", "unreadable",
                                   "--allow_unknown_characters")
        warned = [line for line in output.splitlines() if line.startswith("warning:")]
        check(any("2 different answers ('wtwxwxtx london'" in w for w in warned)
              and any("an answer of 2 lines, joined by a space" in w for w in warned),
              "warned about the task answered twice (both answers named) and the two-line answer")
        unreadable = sum(1 for label in labels.values() if label is None)
        check(f"{unreadable} unreadable" in parse_summary(output)[0],
              f"JSON with --skipped unreadable: {parse_summary(output)[0]}")
        for kind in ("JSON_MIN", "CSV"):
            output, _ = import_answers(folder, train, second[kind], "--dry_run", "--skipped", "unreadable", expect=2)
            check(f"{by_plan['skip']} (not in the export" in error_line(output),
                  f"{kind} leaves the skipped task out: its import names it and says to export JSON")

    with steps.run("round 1: the skipped task answered; JSON, JSON_MIN and CSV import alike; JSON written"):
        skipped_k = PLAN.index("skip")
        client.answer(places[skipped_k][0], [truths[skipped_k]])
        labels[skipped_k] = truths[skipped_k]
        final = export_all(client, project, exports, "round1-final")
        summaries = {}
        for kind, path in final.items():
            output, _ = import_answers(folder, train, path, "--dry_run", "--allow_unknown_characters")
            summaries[kind] = parse_summary(output)
        check(summaries["JSON"] == summaries["JSON_MIN"] == summaries["CSV"],
              f"the three exports import alike: {summaries['JSON'][0]}")
        output, _ = import_answers(folder, train, final["JSON"], "--allow_unknown_characters")
        print("\n".join("  | " + line for line in output.splitlines()))
        rows = read_query_set(os.path.join(train, package["round"]))
        wanted = [(places[k][1], labels[k]) for k in sorted(places) if labels[k] is not None]
        exported = {image["file"]: image for image in package["images"]}
        got = {tuple(origin.split("\t")): (data, label) for data, label, origin in rows}
        right = 0
        for image, label in wanted:
            data, stored = got.get((image["origin"][0], str(image["origin"][1])), (None, None))
            right += stored == label and data == source(train, tuple(image["origin"]))[0]
        check(len(rows) == len(wanted) and right == len(wanted) and all(f in exported for f in files),
              f"the query set {package['round']} holds {len(rows)} samples, each label exactly as answered "
              f"(case, inner space, two lines joined) with the source image's bytes and origin")
    summary = json.load(open(os.path.join(train, package["round"], "summary.json"), encoding="utf-8"))
    steps_round2(steps, client, project, summary, train)


def steps_round2(steps, client, project, summary, train):
    commands = summary["next_commands"]
    with steps.run("round 2: the printed train.py command, run as printed"):
        output, _ = run(shlex.split(commands["train"]))
        check(os.path.isfile(commands["model"]), f"train.py wrote {os.path.relpath(commands['model'], WORK)}")
    with steps.run("round 2: the printed data_sampling.py command, run as printed"):
        output, _ = run(shlex.split(commands["sampling"]))
        folder = shlex.split(commands["sampling"])[-1]
        package = load_package(folder)
        files = {image["file"] for image in package["images"]}
        check(package["label_studio"]["tasks"][label_studio_io.TASKS] == "embedded",
              f"{package['round']}: {len(files)} images, embedded in tasks.json "
              f"({os.path.getsize(os.path.join(folder, label_studio_io.TASKS))} bytes)")
    with steps.run("round 2: tasks.json into the same project; the queue still pre-fills"):
        with open(os.path.join(folder, label_studio_io.TASKS), encoding="utf-8") as f:
            _, reply = client.call("POST", f"/api/projects/{project}/import", json.load(f))
        check(reply["task_count"] == len(files), f"imported {reply['task_count']} more tasks")
        _, info = client.call("GET", f"/api/projects/{project}")
        check(info["model_version"] == label_studio_io.MODEL_VERSION,
              f"the project's model version is still {info['model_version']!r}")
        check_images(client, project, package, folder, files)
        truths = {}

        def answer(task_id, image, k):
            truths[image["file"]] = source(train, tuple(image["origin"]))[1].lower()
            client.answer(task_id, [truths[image["file"]]])
        order = walk_queue(client, project, package, files, answer)
        check(len(order) == len(files), f"the queue gave all {len(files)} round-2 tasks with their readings "
                                        f"pre-filled ({sum(1 for _, i in order if i['reading'])} non-empty)")
    with steps.run("round 2: export, import, query set checked"):
        path = os.path.join(WORK, "exports", "round2.json")
        with open(path, "wb") as f:
            f.write(client.export(project, "JSON"))
        output, _ = import_answers(folder, train, path)
        print("\n".join("  | " + line for line in output.splitlines()[:4]))
        rows = read_query_set(os.path.join(train, package["round"]))
        check(sorted(label for _, label, _ in rows) == sorted(truths.values()),
              f"the query set {package['round']} holds the {len(rows)} answers of round 2 alone (round 1's "
              f"tasks in the same project are not in this package)")


def main(opt):
    global WORK
    steps = Steps()
    WORK = tempfile.mkdtemp(prefix="labelstudio-check-")
    root, models = os.path.join(WORK, "root"), os.path.join(WORK, "models")
    train = os.path.join(root, "train_data_lmdb")
    server, ok = None, False
    print(f"work folder {WORK}")
    try:
        with steps.run("Label Studio's virtualenv"):
            studio = ensure_venv(os.path.abspath(opt.venv))
        with steps.run("data and round 0's model"):
            run([sys.executable, os.path.join(REPO, "tools", "make_synth_lmdb.py"), "--out", root, "--num", "150",
                 "--num_valid", "40", "--num_test", "20", "--workers", "1"])
            make_model(os.path.join(models, "round0"))
        with steps.run("round 1: data_sampling.py --export_annotation"):
            package_dir = os.path.join(root, ROUND1_FOLDER)
            run([sys.executable, os.path.join(REPO, "data_sampling.py"), "--train_data", train, "--valid_data",
                 os.path.join(root, "valid_data_lmdb"), "--select_data", "CVPR2016-NIPS2014", "--batch_ratio",
                 "0.5-0.5", "--total_data_usage_ratio", "0.5", "--saved_model", "models/round0/best_accuracy.pth",
                 "--query", "uncali", "--num_query", str(NUM_QUERY), "--export_annotation", package_dir,
                 "--workers", "0", "--device", "cpu", "--no_progress", "--batch_size", "32", "--threads", "1"],
                env={"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": root})
        with steps.run("start Label Studio"):
            port, email, password = free_port(), "check@example.com", secrets.token_hex(12)
            server = start_server(studio, os.path.join(WORK, "label-studio-data"), root, port, email, password,
                                  os.path.join(WORK, "label-studio.log"))
            client = Client(f"http://127.0.0.1:{port}")
            client.wait(server, opt.start_timeout)
            addresses = listening_addresses(port)
            check(addresses and set(addresses) <= {"127.0.0.1"},
                  f"label-studio (pid {server.pid}) listens on {', '.join(addresses)}:{port} only")
            client.personal_token(email, password)
            status, _ = client.call("GET", "/api/projects", expect=None, header=f"Token {client.token}")
            check(status == 401, f"the personal access token sent the legacy way ('Token' header) is refused "
                                 f"({status}); exchanged for an access token it works as 'Bearer'")
        steps_round1(steps, client, package_dir, train, opt)
        ok = True
    except (CheckFailed, subprocess.CalledProcessError, OSError) as err:
        print(f"\nFAILED: {err}")
    finally:
        if server is not None:
            stop_server(server)
            print(f"stopped label-studio (pid {server.pid}, status {server.returncode})")
        steps.report()
        if ok and not opt.keep:
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            print(f"kept {WORK} (Label Studio's log: label-studio.log)")
    return 0 if ok else 1


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--venv", default=os.path.join(REPO, ".venv-labelstudio"),
                        help=f"virtualenv with label-studio {VERSION}; built when missing")
    parser.add_argument("--start_timeout", type=float, default=600,
                        help="seconds to wait for Label Studio to answer (its first start migrates its database)")
    parser.add_argument("--record", default="",
                        help="keep round 1's first exports (JSON, JSON_MIN, CSV), its package.json and the answers "
                             "given in this folder (the unit tests' tests/data/labelstudio)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
