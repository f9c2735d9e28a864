#!/usr/bin/env bash
# The demo the project ships: demo/genesis.txt (the Book of Genesis, King James Version, public domain, as Debian's
# bible-kjv package prints it: `apt-get install bible-kjv`) and demo/genesis-gpt2/, a small GPT-2 trained on it
# from scratch by `candlewick train` in the NumPy reference; its loss curve is copied to docs/demo-loss.png.
# usage: bash scripts/make_demo.sh          (about 15 minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
# one verse per line, without the "Ge1:1 " references; Exodus 1-4 is the text the tutorial fine-tunes on
bible -f gen1:1-gen50:26 | sed -E 's/^[A-Za-z]+[0-9]+:[0-9]+ //' > demo/genesis.txt
bible -f ex1:1-ex4:31 | sed -E 's/^[A-Za-z]+[0-9]+:[0-9]+ //' > demo/exodus-1-4.txt
candlewick train demo/genesis-gpt2 --data demo/genesis.txt --arch gpt2 --steps 1500 --seed 0 \
    --vocab-size 1024 --dim 96 --layers 4 --heads 4 --context 128 --batch-size 8 --force
cp demo/genesis-gpt2/loss.png docs/demo-loss.png
