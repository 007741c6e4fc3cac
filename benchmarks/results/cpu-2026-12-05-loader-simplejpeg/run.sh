#!/bin/bash
# alternate base (HEAD before the change) and new, 3 runs each, ImageNet-sized and bench photos
cd /tmp/benchab
for i in 1 2 3; do
 for k in inet photos; do
  flag=""; [ $k = inet ] && flag="--imagenet-sized"
  for v in base new; do
   src=/work/main; [ $v = base ] && src=/tmp/wt-base
   PYTHONPATH=$src timeout 400 python -m vitscale.cli bench --what data $flag --images 256 --batches 8 --rounds 7 --json $k-$v-$i.json > $k-$v-$i.txt 2>&1
  done
 done
done
echo done > ALLDONE
