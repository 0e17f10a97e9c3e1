"""Turn the answers to an annotation package (data_sampling.py --export_annotation) into the
query set the next training round reads.

    python import_annotations.py --package train_data_lmdb/uncali_iter_1_annotation \
        --train_data train_data_lmdb [--answers export.json] [--name uncali_iter_1]

The answers are the package's corrected gt.txt (the default), a Label Studio export (JSON,
JSON_MIN or CSV; docs/label-studio.md) or a `file,label` CSV. Every exported image must be answered
exactly once (a task skipped in Label Studio counts as unreadable with --skipped unreadable); an
empty or `###` answer marks it unreadable (kept out of training, never queried again). Nothing is written unless every
check passes; the query set appears atomically, with `query-meta` and a summary.json. A package
exported with --relabel_ratio also holds second looks at labelled samples: their answers become the
relabel set `<name>_relabel` (written just before the query set), which the next round's selection
names with the share 0. A review package (find_label_errors.py --export_annotation) holds second
looks alone: its import writes only the relabel set `<name>`."""
import argparse
import math
import os

from annotators import annotation
from safe_files import locking
from active_learning import relabel
import utils
import options
from active_learning.query_sets import check_out_name, check_output_free, list_leaf_lmdbs


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--package", required=True, help="the folder data_sampling.py --export_annotation wrote")
    parser.add_argument("--train_data", required=True,
                        help="root of the training LMDBs the package was drawn from; the query set is written here")
    parser.add_argument("--name", default="",
                        help="name of the query set (default: the package's round, <query>_iter_<k>); the rules of "
                             "data_sampling.py --out_name apply")
    parser.add_argument("--answers", default="",
                        help="the answers: a gt.txt (images/<file><TAB>label), a Label Studio export (JSON, JSON_MIN "
                             "or CSV) or a file,label CSV, told apart by the extension (.txt/.tsv) and the content "
                             "(default: the package's gt.txt)")
    parser.add_argument("--skipped", choices=annotation.SKIPPED, default="missing",
                        help="a task skipped in Label Studio (JSON export): missing, so the import is refused naming "
                             "it, or unreadable (kept out of training, never asked again)")
    parser.add_argument("--several_answers", choices=annotation.SEVERAL, default="latest",
                        help="a Label Studio task answered more than once with different texts: take the latest "
                             "(with a warning), count it unreadable, or refuse the import")
    parser.add_argument("--allow_unknown_characters", action="store_true",
                        help="keep answers with characters outside the model's charset (reported; training's label "
                             "filter leaves them out) instead of refusing the import")
    options.add_overwrite_arg(parser, "replace an existing query set of that name, and its relabel set (never a base "
                                      "dataset or another folder)")
    options.add_lock_timeout_arg(parser)
    parser.add_argument("--dry_run", action="store_true", help="check everything and print the summary; write nothing")
    return parser


def main(opt):
    if not os.path.isdir(opt.train_data):
        raise utils.UserError(f"--train_data {opt.train_data}: no such folder; give the root the package was drawn "
                              f"from")
    if not math.isfinite(opt.lock_timeout):
        raise utils.UserError(f"--lock_timeout {opt.lock_timeout}: give seconds (0: fail at once, -1: no limit)")
    package = annotation.Package(opt.package)
    answers_path, fmt = annotation.locate_answers(opt.package, opt.answers)
    answers, warnings = annotation.read_answers(package, answers_path, fmt, several=opt.several_answers)
    judged = annotation.judge(package, answers, answers_path, allow_unknown=opt.allow_unknown_characters,
                              skipped=opt.skipped, fmt=fmt)
    for warning in warnings:
        print(f"warning: {warning}")
    for where, label, outside, _ in judged.unknown:
        print(f"warning: {where}: {label!r} holds characters outside the charset ({outside!r}); kept, but "
              f"training's label filter leaves it out")
    with locking.exclusive(opt.train_data, opt.lock_timeout):
        if package.review:
            return import_review(opt, package, judged, answers_path, fmt)
        leaves = list_leaf_lmdbs(opt.train_data)
        name = opt.name or package.round
        check_out_name(name, leaves, opt.train_data, flag="--name")
        path = os.path.join(opt.train_data, name)
        check_output_free(path, opt.overwrite, flag="--name")
        replaced = name if os.path.lexists(path) else None
        relabel_path = None
        if package.of_kind(annotation.RELABEL):
            relabel_name = relabel.relabel_name(name)
            check_out_name(relabel_name, leaves, opt.train_data, flag="--name")
            relabel_path = os.path.join(opt.train_data, relabel_name)
            relabel.check_free(relabel_path, opt.train_data, opt.overwrite, flag="--name")
        annotation.check_origins(package, opt.train_data, replaced)
        summary = annotation.import_summary(package, judged, name, path, opt.train_data, answers_path, fmt,
                                            relabel_path)
        if opt.dry_run:
            print("dry run: nothing written")
            print(annotation.format_import_summary(summary))
            return summary
        queried = judged.of_kind(annotation.QUERY)
        if relabel_path:  # first: an import stopped before its query set leaves an orphan the rerun replaces
            annotation.write_relabel_set(relabel_path, judged.of_kind(annotation.RELABEL), opt.train_data, package,
                                         name, answers_path, fmt, replace=os.path.lexists(relabel_path))
        meta = annotation.import_meta(package, queried, name, answers_path, fmt)
        annotation.write_query_set(path, queried, opt.train_data, meta, summary, replace=replaced is not None)
        annotation.record_pending(opt.train_data, imported=opt.package)
    print(annotation.format_import_summary(summary))
    return summary


def import_review(opt, package, judged, answers_path, fmt):
    """A review package's answers into the relabel set --name (default: the package's), under the
    lock the caller holds."""
    name = opt.name or package.round
    check_out_name(name, list_leaf_lmdbs(opt.train_data), opt.train_data, flag="--name")
    path = os.path.join(opt.train_data, name)
    relabel.check_free(path, opt.train_data, opt.overwrite, flag="--name")
    annotation.check_origins(package, opt.train_data, None)
    summary = annotation.review_summary(package, judged, path, opt.train_data, answers_path, fmt)
    if opt.dry_run:
        print("dry run: nothing written")
    else:
        annotation.write_relabel_set(path, judged, opt.train_data, package, None, answers_path, fmt,
                                     replace=os.path.lexists(path))
        annotation.record_pending(opt.train_data, imported=opt.package)
    print(annotation.format_review_summary(summary))
    return summary


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
