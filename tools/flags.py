"""Write docs/flags.md: the flags of every script, taken from the scripts' own argparse parsers.

    python tools/flags.py --write     # regenerate docs/flags.md (after adding or changing a flag)
    python tools/flags.py --check     # exit 1 if docs/flags.md differs from the parsers
    python tools/flags.py             # print the page

A script is any .py file at the repository root or in tools/ with a `__main__` block, and any
scripts/*.sh that answers --help. A Python script's parser comes from its get_args_parser() when it
has one; otherwise its parse_args(argv) or main(argv) is called with argparse stopped at the
moment it would parse, so the parser is taken without running anything. A shell script's --help
text is shown as it prints it.
"""
import argparse
import importlib.util
import inspect
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from safe_files import atomic_io  # noqa: E402
import options  # noqa: E402

OUTPUT = os.path.join("docs", "flags.md")
REGENERATE = "python tools/flags.py --write"
# the order a reader meets them in: one round's three commands first
FIRST = ("train.py", "data_sampling.py", "test.py", "demo.py", "create_lmdb_dataset.py", "find_label_errors.py",
         "import_annotations.py")
# Defaults that follow the core count (--workers) are shown as on a machine with this many usable cores, so
# that the page is the same on every machine; rows whose text changes with the count are marked.
REFERENCE_CORES = 2
MARK = "†"


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def python_scripts(repo=REPO):
    found = []
    for folder in ("", "tools"):
        for name in sorted(os.listdir(os.path.join(repo, folder) if folder else repo)):
            rel = os.path.join(folder, name) if folder else name
            if not name.endswith(".py") or not os.path.isfile(os.path.join(repo, rel)):
                continue
            with open(os.path.join(repo, rel), encoding="utf-8") as f:
                if 'if __name__ == "__main__"' in f.read():
                    found.append(rel)
    return sorted(found, key=lambda rel: (FIRST.index(rel) if rel in FIRST else len(FIRST), rel.count("/"), rel))


def shell_scripts(repo=REPO):
    folder = os.path.join(repo, "scripts")
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.endswith(".sh") and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if "--help)" in f.read():
                    found.append(os.path.join("scripts", name))
    return found


def load_script(rel, repo=REPO):
    """A fresh module object of the script (not registered under the script's name, so that nothing
    that imported it before sees a second copy); defaults computed at import time are recomputed."""
    name = "_flags_" + rel.replace("/", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, rel))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the like look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _capture(entry):
    """Call a script's parse_args(argv) or main(argv) and take the parser at the moment it would parse."""
    def stop(self, *args, **kwargs):
        raise _Captured(self)

    saved = (argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv)
    argparse.ArgumentParser.parse_args = stop
    argparse.ArgumentParser.parse_known_args = stop
    sys.argv = [sys.argv[0]]
    try:
        entry(*([[]] if inspect.signature(entry).parameters else []))
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    return None


def parser_of(rel, repo=REPO):
    module = load_script(rel, repo)
    if callable(getattr(module, "get_args_parser", None)):
        parser = module.get_args_parser()
    else:
        parser = None
        for entry in ("parse_args", "main"):
            if callable(getattr(module, entry, None)):
                parser = _capture(getattr(module, entry))
                if parser is not None:
                    break
    if parser is None:
        raise SystemExit(f"error: tools/flags.py finds no parser in {rel}: give it a get_args_parser() that returns "
                         "its argparse.ArgumentParser")
    parser.prog = rel
    module_doc = (module.__doc__ or "").strip()
    return parser, module_doc


def _escape(text):
    """Markdown table text: no line breaks or bare pipes; <...> outside code spans would be taken for HTML."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def _help_text(parser, action):
    if not action.help:
        return ""
    params = dict(vars(action), prog=parser.prog)
    for name in list(params):
        if params[name] is argparse.SUPPRESS:
            del params[name]
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return action.help % params


def _default_text(action):
    if action.nargs == 0:  # store_true / store_false / store_const / help
        if isinstance(action, argparse._StoreTrueAction):
            return "off"
        if isinstance(action, argparse._StoreFalseAction):
            return "on"
        return ""
    if action.default is None or action.default == "" or action.default is argparse.SUPPRESS:
        return ""
    default = action.default
    # a default inside the checkout (labelstudio_check's --venv) is shown relative to it, so that the
    # page is the same in every clone
    if isinstance(default, str) and os.path.isabs(default) and default.startswith(REPO + os.sep):
        default = os.path.relpath(default, REPO)
    return f"`{default}`"


def _flag_text(parser, action):
    formatter = parser._get_formatter()
    if not action.option_strings:
        return f"`{formatter._format_args(action, action.dest)}`"
    # a value's placeholder only where it tells something: a named metavar, the choices, or an optional value;
    # the default column already tells a switch (off/on) from a flag that takes a value
    telling = action.nargs != 0 and (action.metavar is not None or action.choices is not None
                                     or action.nargs in ("?", "*", "+"))
    args = " " + formatter._format_args(action, action.dest.upper()) if telling else ""
    return ", ".join(f"`{option}{args}`" for option in action.option_strings)


def table_rows(parser):
    """[(group title, [(flag, default, help)])] of the visible flags, in the order --help shows them."""
    groups = []
    for group in parser._action_groups:
        rows = []
        for action in group._group_actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            required = " (required)" if action.required and action.option_strings else ""
            rows.append((_flag_text(parser, action), _default_text(action),
                         _escape(_help_text(parser, action)) + required))
        if rows:
            groups.append((group.title, rows))
    return groups


def _with_cores(count, build):
    saved = options.usable_cores
    options.usable_cores = lambda: count
    try:
        return build()
    finally:
        options.usable_cores = saved


def python_section(rel, repo=REPO):
    parser, _ = _with_cores(REFERENCE_CORES, lambda: parser_of(rel, repo))
    groups = table_rows(parser)
    other, _ = _with_cores(REFERENCE_CORES + 1, lambda: parser_of(rel, repo))
    other_rows = {row[0]: row for _, rows in table_rows(other) for row in rows}
    changing = {flag for _, rows in groups for (flag, *rest) in rows if other_rows.get(flag) != (flag, *rest)}
    lines = [f"## {rel}", ""]
    if parser.description:
        lines += [_escape(parser.description), ""]
    for title, rows in groups:
        if len(groups) > 1 or title not in ("options", "optional arguments"):
            lines += [f"**{title}**", ""]
        lines += ["| flag | default | meaning |", "|---|---|---|"]
        for flag, default, text in rows:
            mark = f" {MARK}" if flag in changing else ""
            lines.append(f"| {flag} | {default}{mark} | {text} |")
        lines.append("")
    return "\n".join(lines)


def shell_section(rel, repo=REPO):
    result = subprocess.run(["bash", os.path.join(repo, rel), "--help"], cwd=repo, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"error: bash {rel} --help exited with status {result.returncode}: {result.stderr.strip()}")
    return "\n".join([f"## {rel}", "", f"`{rel} --help` prints:", "", "```", result.stdout.rstrip("\n"), "```", ""])


def anchor(title):
    """The fragment GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    kept = "".join(c for c in title.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def generate(repo=REPO):
    pythons, shells = python_scripts(repo), shell_scripts(repo)
    lines = ["# Flags of every script", "",
             f"Generated from the scripts' argparse parsers by `{REGENERATE}`; do not edit by hand "
             "(`tests/test_docs.py` fails when this page and the parsers differ). `--help` of each script says "
             "the same, with the longer descriptions some scripts add. What the flags do in a round: "
             "[rounds](rounds.md).", "",
             f"{MARK} The default follows the machine's usable cores; shown as on a machine with "
             f"{REFERENCE_CORES}.", ""]
    lines += [f"- [{rel}](#{anchor(rel)})" for rel in pythons + shells] + [""]
    sections = [python_section(rel, repo) for rel in pythons] + [shell_section(rel, repo) for rel in shells]
    return "\n".join(lines) + "\n" + "\n".join(sections).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {OUTPUT} (atomically)")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT} differs from the parsers")
    args = parser.parse_args(argv)
    text = generate()
    path = os.path.join(REPO, OUTPUT)
    if args.write:
        atomic_io.atomic_write_text(path, text)
        print(f"wrote {OUTPUT}")
    elif args.check:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{OUTPUT} differs from the parsers; run `{REGENERATE}`", file=sys.stderr)
                return 1
        print(f"{OUTPUT} matches the parsers")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
