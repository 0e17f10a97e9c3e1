"""The user documentation stays true to the code: docs/flags.md is what the parsers say, every shell
command in README.md and the guides parses with the script it runs, and every link resolves.

Which commands are checked, and how (the rule):
- Documents: README.md and every docs/*.md guide, except docs/flags.md (generated, checked against
  the parsers as a whole), docs/RESULTS.md (a record of the commands that were run, with their
  elisions) and docs/DESIGN.md (for contributors, no commands to copy).
- Commands: the lines of fenced code blocks, backslash continuations joined, `#` comments dropped.
  A line is a command of this project when, after environment assignments and the wrappers `env`,
  `nice`, `taskset -c N` and `torchrun --nproc_per_node N`, it runs `python <script>.py`,
  `[bash] scripts/<name>.sh` or `make <target>`. Other lines (conda, for/done, output) are not.
- Placeholders: `<...>` is a value (read as `1`, which text, paths and numbers accept);
  `[--flag value | --other]` is an optional part and is checked
  with its first alternative; another `[...]` is a value when glued to text or after a flag that
  takes one (`--saved_model [path_to_the_model_of_last_round]`) and prose otherwise (dropped). A
  command holding a word that starts with `...` is an outline: only its script must exist.
- Python scripts: the words are parsed by the script's own argparse parser, in this process
  (tools/flags.py takes the parser as --help would print it), so every flag must exist and every
  value must have its type and choices. That is what the command's --help/--dry_run form checks
  before touching a file, and it needs none of the datasets and models the commands name (real
  datasets, a finished round), so no command is skipped for a missing file; what the scripts then
  do with the files is what the rest of the suite tests.
- scripts/*.sh: every `--flag` must be one the script's --help lists, each followed by a value.
- make: the target must be one the Makefile defines, and every VAR=value one it declares with `?=`.
"""
import os
import re
import shlex
import subprocess

import pytest

from tools import flags

REPO = flags.REPO
NOT_GUIDES = {"docs/flags.md", "docs/RESULTS.md", "docs/DESIGN.md"}
WRAPPERS = {"env", "nice", "exec"}
PLACEHOLDER = "1"  # what a placeholder value stands for: a word every type (text, path, number) reads


def documents():
    guides = sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                    if name.endswith(".md"))
    return ["README.md"] + [doc for doc in guides if doc not in NOT_GUIDES]


def fenced_blocks(text):
    """(first line number, lines) of every fenced code block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def command_lines(text):
    """(line number, command text) of the fenced blocks, continuations joined."""
    found = []
    for start, lines in fenced_blocks(text):
        pending, first = "", None
        for offset, line in enumerate(lines):
            if first is None:
                first = start + offset
            stripped = line.strip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            found.append((first, pending + stripped))
            pending, first = "", None
        if pending:
            found.append((first, pending))
    return found


def _placeholders(command):
    """The command with its documentation placeholders replaced by words a parser can read."""
    def optional(match):
        return match.group(1).split(" | ")[0]

    command = re.sub(r"\[(--[^\]]*)\]", optional, command)
    command = re.sub(r"<[^<>]*>", PLACEHOLDER, command)

    def value_or_prose(match):
        before = command[:match.start()]
        if before and not before[-1].isspace():
            return PLACEHOLDER
        words = before.split()
        return PLACEHOLDER if words and words[-1].startswith("--") and "=" not in words[-1] else ""

    return re.sub(r"\[[^\]]*\]", value_or_prose, command)


def parse_command(command):
    """(kind, program, args) of a command of this project, or None for any other line.
    kind: 'python', 'shell' or 'make'."""
    try:
        words = shlex.split(_placeholders(command), comments=True)
    except ValueError:
        return None
    while words:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in WRAPPERS:
            words = words[1:]
        elif words[0] == "taskset" and len(words) > 2:
            words = words[3:]
        elif words[0] == "torchrun":
            words = words[1:]
            while words and words[0].startswith("--"):
                words = words[1:] if "=" in words[0] else words[2:]
        else:
            break
    if not words:
        return None
    if words[0] in ("python", "python3", "$PY") and len(words) > 1 and words[1].endswith(".py"):
        return "python", words[1], words[2:]
    if words[0].endswith(".py"):  # under torchrun
        return "python", words[0], words[1:]
    if words[0] == "bash" and len(words) > 1:
        words = words[1:]
    if words[0].startswith("scripts/") and words[0].endswith(".sh"):
        return "shell", words[0], words[1:]
    if words[0] == "make":
        return "make", "Makefile", words[1:]
    return None


_PARSERS = {}  # per script: its argparse parser, or the flags a shell script's --help lists


def _parser(script):
    if script not in _PARSERS:
        _PARSERS[script] = flags.parser_of(script)[0]
    return _PARSERS[script]


def _shell_flags(script):
    if script not in _PARSERS:
        result = subprocess.run(["bash", os.path.join(REPO, script), "--help"], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        _PARSERS[script] = set(re.findall(r"^\s+(--[a-z_]+)", result.stdout, re.M))
    return _PARSERS[script]


def _makefile():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        text = f.read()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*\?=", text, re.M))
    return targets, variables


def problem_of(command):
    """Why `command` would not run as written, or None (also None for lines that are no command
    of this project)."""
    parsed = parse_command(command)
    if parsed is None:
        return None
    kind, program, args = parsed
    if kind != "make" and not os.path.isfile(os.path.join(REPO, program)):
        return f"{program}: no such script"
    if any(word.startswith("...") for word in args):
        return None  # an outline: the script exists, the rest is elided
    if kind == "python":
        parser = _parser(program)
        messages = []

        def refuse(message):
            messages.append(message)
            raise SystemExit(2)

        saved, parser.error = parser.error, refuse
        try:
            parser.parse_args(args)
        except SystemExit:
            return f"{program}: {messages[0] if messages else 'exits while parsing'}"
        finally:
            parser.error = saved
        return None
    if kind == "shell":
        known = _shell_flags(program)
        for flag, value in zip(args[::2], args[1::2] + [None]):  # every setting is a flag and its value
            if flag not in known:
                return f"{program}: {flag} is no flag its --help lists ({', '.join(sorted(known))})"
            if value is None:
                return f"{program}: {flag} needs a value"
        return None
    targets, variables = _makefile()
    for word in args:
        if "=" in word:
            if word.split("=", 1)[0] not in variables:
                return f"make: {word.split('=', 1)[0]} is no variable of the Makefile"
        elif word not in targets:
            return f"make: no target {word}"
    return None


def all_commands():
    for doc in documents():
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            text = f.read()
        for line, command in command_lines(text):
            if parse_command(command) is not None:
                yield doc, line, command


def test_flags_page_matches_the_parsers():
    with open(os.path.join(REPO, flags.OUTPUT), encoding="utf-8") as f:
        written = f.read()
    generated = flags.generate()
    if written != generated:
        old, new = written.split("\n"), generated.split("\n")
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/flags.md differs from the scripts' parsers (first at line {first + 1}: "
                    f"{old[first] if first < len(old) else '<end>'!r} against "
                    f"{new[first] if first < len(new) else '<end>'!r}); regenerate it with `{flags.REGENERATE}`")


def test_flags_page_lists_every_script_and_flag():
    with open(os.path.join(REPO, flags.OUTPUT), encoding="utf-8") as f:
        page = f.read()
    for script in ("train.py", "data_sampling.py", "test.py", "demo.py", "create_lmdb_dataset.py",
                   "find_label_errors.py", "import_annotations.py", "tools/experiment.py", "scripts/al_loop.sh"):
        assert f"\n## {script}\n" in page
    # a flag from each way of finding a parser: get_args_parser, parse_args(argv), main(argv), --help text
    for row in ("| `--select_data` |", "| `--checkValid [CHECKVALID]` | `True` |", "| `--run` |",
                "--relabel_policy P"):
        assert row in page


def test_flags_generator_reads_every_kind_of_script(tmp_path):
    """A repository of four made-up scripts: each way of building a parser, and a default that
    follows the core count, comes out as a table row."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "alpha.py").write_text(
        "import argparse\nimport options\n"
        "def get_args_parser():\n"
        "    p = argparse.ArgumentParser(description='Alpha does a thing.')\n"
        "    g = p.add_argument_group('inputs')\n"
        "    g.add_argument('--size', type=int, default=3, help='how many | at most <n>')\n"
        "    g.add_argument('--mode', choices=['a', 'b'], default='a', help='which, 100%% sure')\n"
        "    p.add_argument('--cores', type=int, default=options.usable_cores(), help='workers')\n"
        "    p.add_argument('--fast', action='store_true', help='go **fast**')\n"
        "    p.add_argument('--hidden', help=argparse.SUPPRESS)\n"
        "    return p\n"
        "if __name__ == \"__main__\":\n    get_args_parser().parse_args()\n")
    (tmp_path / "beta.py").write_text(
        "import argparse\n"
        "def parse_args(argv=None):\n"
        "    p = argparse.ArgumentParser(description='Beta.')\n"
        "    p.add_argument('--out', required=True, help='folder')\n"
        "    return p.parse_args(argv)\n"
        "if __name__ == \"__main__\":\n    parse_args()\n")
    (tmp_path / "tools" / "gamma.py").write_text(
        "import argparse, sys\n"
        "def main(argv=None):\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('--run', metavar='DIR', help='a run')\n"
        "    p.parse_args(argv)\n"
        "    sys.exit('main ran past its parser')\n"
        "if __name__ == \"__main__\":\n    main()\n")
    (tmp_path / "notascript.py").write_text("import argparse\n")
    (tmp_path / "scripts" / "loop.sh").write_text(
        "case \"$1\" in\n  -h|--help) echo '  --rounds N   rounds'; exit 0 ;;\nesac\nexit 3\n")
    page = flags.generate(str(tmp_path))
    assert "- [alpha.py](#alphapy)\n- [beta.py](#betapy)\n- [tools/gamma.py](#toolsgammapy)\n" \
           "- [scripts/loop.sh](#scriptsloopsh)\n" in page
    assert "notascript" not in page and "--hidden" not in page
    assert "## alpha.py\n\nAlpha does a thing.\n\n**options**\n" in page and "\n**inputs**\n" in page
    assert "| `--size` | `3` | how many \\| at most &lt;n&gt; |" in page
    assert "| `--mode {a,b}` | `a` | which, 100% sure |" in page
    assert f"| `--cores` | `{flags.REFERENCE_CORES}` {flags.MARK} | workers |" in page
    assert "| `--fast` | off | go \\*\\*fast\\*\\* |" in page
    assert "| `--out` |  | folder (required) |" in page
    assert "| `--run DIR` |  | a run |" in page
    assert "```\n  --rounds N   rounds\n```" in page


def test_placeholders_and_rules():
    assert parse_command("conda env create -f environment.yaml") is None
    assert parse_command("OMP_NUM_THREADS=1 taskset -c 1 make compare COMPARE_JOBS=1") == \
        ("make", "Makefile", ["compare", "COMPARE_JOBS=1"])
    assert parse_command("torchrun --nproc_per_node 2 train.py --mode al") == ("python", "train.py", ["--mode", "al"])
    assert parse_command("python train.py --select_data A-B-[lmdb data_for_iter_training] "
                         "--saved_model [path_to_model] [--resume | --dry_run] --out <run>/x "
                         "[the settings of scripts/al_loop.sh]") == \
        ("python", "train.py", ["--select_data", "A-B-1", "--saved_model", "1", "--resume", "--out", "1/x"])
    assert problem_of("python train.py --Transformation None --FeatureExtraction VGG --SequenceModeling None "
                      "--Prediction CTC --valInterva 10") is None
    assert "unrecognized arguments: --no_such_flag" in problem_of(
        "python train.py --Transformation None --FeatureExtraction VGG --SequenceModeling None --Prediction CTC "
        "--no_such_flag 1")
    assert "invalid choice" in problem_of("python train.py --Transformation None --FeatureExtraction VGG "
                                          "--SequenceModeling None --Prediction CTC --mode sideways")
    assert "required" in problem_of("python import_annotations.py --package p")
    assert problem_of("python nosuch.py --x 1") == "nosuch.py: no such script"
    assert problem_of("python train.py ... --no_such_flag") is None  # an outline
    assert problem_of("scripts/al_loop.sh --rounds 3 --query uncali") is None
    assert "--round is no flag" in problem_of("scripts/al_loop.sh --round 3")
    assert problem_of("scripts/al_loop.sh --arch '--Prediction CTC --amp' --rounds 1") is None
    assert problem_of("scripts/al_loop.sh --rounds") == "scripts/al_loop.sh: --rounds needs a value"
    assert problem_of("make demo DEMO_QUERY=random") is None
    assert problem_of("make demos") == "make: no target demos"
    assert problem_of("make demo DEMO_QUREY=random") == "make: DEMO_QUREY is no variable of the Makefile"


def test_every_documented_command_parses():
    commands = list(all_commands())
    # the seed's three commands in the README, the loop, make demo/test/compare and the guides' examples
    assert sum(doc == "README.md" for doc, _, _ in commands) >= 5
    assert len(commands) >= 20
    problems = [f"{doc}:{line}: {problem}" for doc, line, command in commands
                for problem in [problem_of(command)] if problem]
    assert not problems, "commands that would not run as written:\n" + "\n".join(problems)


def _headings_anchors(text):
    anchors, seen = set(), {}
    in_fence = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            slug = flags.anchor(re.sub(r"^#+ ", "", line))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(text):
    """(target) of every markdown link and image outside code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_every_link_resolves():
    problems, checked = [], 0
    for doc in documents() + ["docs/RESULTS.md", "docs/DESIGN.md"]:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            text = f.read()
        for target in _links(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            checked += 1
            if not os.path.exists(os.path.join(REPO, resolved)):
                problems.append(f"{doc}: {target}: no file {resolved}")
                continue
            if fragment:
                with open(os.path.join(REPO, resolved), encoding="utf-8") as f:
                    if fragment not in _headings_anchors(f.read()):
                        problems.append(f"{doc}: {target}: no heading #{fragment} in {resolved}")
    assert checked >= 50
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door_linking_every_guide():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.split("\n")) <= 320
    linked = {os.path.normpath(target.partition("#")[0]) for target in _links(readme)}
    guides = {os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")}
    assert guides <= linked, f"guides the README does not link: {sorted(guides - linked)}"
    # the seed's three commands, flag for flag
    for command in ("python train.py", "python data_sampling.py"):
        assert command in readme
    assert readme.count("--query_iter random_iter_") == 2 and "--query random\n" in readme
