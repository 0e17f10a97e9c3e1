"""How a re-annotation (a relabel set's answer, data_sampling.py --relabel_policy) combines with
the label a sample trains on, the registry `POLICIES`: name -> decide(current, answer), which
returns KEEP (train on the current label), TAKE (train on the answer) or DROP (leave the sample
out of training). Both labels are compared as training reads them (normalised, with the simulated
annotator's error on each).

- `replace` (the default, and what a relabel set without a policy in its meta means): the second
  answer wins. It cannot tell which of two disagreeing answers is right, so with a noisy annotator
  it turns clean labels wrong as often as it fixes wrong ones.
- `agree` (two-annotator consensus): two equal answers keep the label; two that differ give no
  trustworthy label and the sample is dropped. A fresh error almost never repeats the first one,
  so a wrong label looked at is removed and a clean label is never made wrong (it may be dropped).

Kept free of torch, so that scripts/al_loop.sh can list the names cheaply."""

KEEP, TAKE, DROP = "keep", "take", "drop"
DEFAULT = "replace"


def replace(current, answer):
    return TAKE


def agree(current, answer):
    return KEEP if answer == current else DROP


POLICIES = {"replace": replace, "agree": agree}


def known():
    return ", ".join(POLICIES)


def decide(policy, current, answer):
    """KEEP, TAKE or DROP for a sample trained on `current` that the re-annotation answers with
    `answer` under `policy` (a name of POLICIES; KeyError otherwise: callers check names first)."""
    return POLICIES[policy](current, answer)
