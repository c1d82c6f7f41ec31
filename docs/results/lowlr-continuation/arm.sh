#!/bin/bash
# usage: arm.sh NAME LR NOISE END ; continues the shipped step-2400 model at a constant LR, copy every 100 steps
set -e
cd "$(git rev-parse --show-toplevel)" && source .venv/bin/activate  # from the repository root
D=~/.cache/pgesam/runs/lowlr/$1; mkdir -p $D
[ -f $D/transformer.pt ] || cp checkpoints/small/transformer.pt $D/transformer.pt
for s in $(seq 2500 100 $4); do
  [ -f $D/step-$s.pt ] && continue
  pgesam-train transformer train --preset small --out $D --resume --steps $4 --lr $2 --min-lr-ratio 1 \
     --input-noise $3 --stop-after $s --threads 1
  cp $D/transformer.pt $D/step-$s.pt
done
