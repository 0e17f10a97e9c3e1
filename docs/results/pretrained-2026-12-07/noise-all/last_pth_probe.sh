#!/bin/bash
# Probe of docs/RESULTS.md section 11 (bash docs/results/pretrained-2026-12-07/noise-all/last_pth_probe.sh runs/pre-noise):
# the test and validation accuracy of each noise cell's last.pth (the model at the end of
# its round's training, not the one validation kept)
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" && source .venv/bin/activate  # from the repository root
out=${1:-runs/pre-noise}
for cell in $out/cells/*; do
  for k in 1 2; do
    m=$cell/models/round$k/last.pth
    [ -f $m ] || continue
    for set in test valid; do
      data=data/target/${set}_data_lmdb
      dest=runs/lastprobe/$(basename $out)/$(basename $cell)/round$k/$set
      [ -f $dest/results.json ] && continue
      OMP_NUM_THREADS=1 python test.py --eval_data $data --saved_model $m --batch_size 64 --workers 1 --output $dest > /dev/null 2>&1 || echo "failed: $m $set"
    done
  done
done
python - "$out" <<'P'
import json, glob, os, sys, collections, statistics
out = os.path.basename(sys.argv[1])
rows = collections.defaultdict(list)
for path in sorted(glob.glob(f"runs/lastprobe/{out}/*/round*/*/results.json")):
    parts = path.split("/")
    cell, k, split = parts[-4], parts[-3], parts[-2]
    key = (cell.rsplit("-seed", 1)[0], k, split)
    res = json.load(open(path))
    total = res.get("total") or res
    rows[key].append((total["accuracy"], total["ece"]))
for (cell, k, split), vals in sorted(rows.items()):
    acc = [a for a, _ in vals]; ece = [e for _, e in vals]
    print(f"{cell} {k} {split}: last.pth accuracy {statistics.fmean(acc):.2f} (sd {statistics.pstdev(acc):.2f}, n {len(acc)}), ECE {statistics.fmean(ece):.4f}")
P
