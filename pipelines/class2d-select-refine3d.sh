#!/usr/bin/env bash
# From particles to a refined map on this machine: import -> class2d -> select classes -> refine3d -> reports.
#
#   bash pipelines/class2d-select-refine3d.sh PROJECT [PARTICLES.star REFERENCE.mrc]
#
# PROJECT is a RELION-style project folder: every step runs inside it and writes its own
# subfolder (Import/, Class2D/, Select/, Refine3D/); image names in PARTICLES.star are relative
# to it, as in RELION. Without PARTICLES and REFERENCE, a small data set is simulated there first
# (box 32, 5 A/px; the phantom it comes from is the reference, low-passed by --ini_high), which
# runs in a few minutes on a laptop.
#
# Settings (environment variables, defaults in brackets):
#   CRYODASK        the cryodask command [cryodask]
#   N               particles to simulate [1000]
#   K               2D classes [20]              ITER_2D   2D iterations [25]
#   DIAMETER        mask diameter, A [each job's default, from the box]
#   MIN_FRACTION    keep 2D classes with at least this share of the particles [0.02]
#   MAX_RESOLUTION  ... and an estimated resolution this good or better, A [999]
#   INI_HIGH        low-pass of the reference, A [30]
#   EXEC            execution options for the two jobs, e.g. "--workers 4 --j 2" or
#                   "--cluster cluster_configs/slurm-cpu.yaml" [none: a LocalCluster sized to the machine]
#   EXTRA_2D, EXTRA_3D   more options for class2d / refine3d (e.g. EXTRA_3D="--sym C2") [none]
set -euo pipefail

if [ $# -ne 1 ] && [ $# -ne 3 ]; then
  echo "usage: $0 PROJECT [PARTICLES.star REFERENCE.mrc]" >&2
  exit 2
fi
CRYODASK=${CRYODASK:-cryodask}
K=${K:-20}; ITER_2D=${ITER_2D:-25}; N=${N:-1000}
MIN_FRACTION=${MIN_FRACTION:-0.02}; MAX_RESOLUTION=${MAX_RESOLUTION:-999}; INI_HIGH=${INI_HIGH:-30}
EXEC=${EXEC:-}; EXTRA_2D=${EXTRA_2D:-}; EXTRA_3D=${EXTRA_3D:-}

mkdir -p "$1"
if [ $# -eq 3 ]; then
  particles=$(realpath "$2"); reference=$(realpath "$3")
fi
cd "$1"
if [ $# -eq 1 ]; then
  echo "== simulate $N particles (box 32, 5 A/px)"
  $CRYODASK simulate --phantom 32 --angpix 5 --n "$N" --snr 0.3 --o .
  particles=particles.star; reference=phantom.mrc
fi
# the mask diameter (A): given, or each job's default (RELION's: from the box)
DIAM=${DIAMETER:+--particle_diameter $DIAMETER}

echo "== import"
mkdir -p Import Class2D Select Refine3D
$CRYODASK import --i "$particles" --o Import/particles.zarr --overwrite

echo "== class2d: K=$K, $ITER_2D iterations"
# shellcheck disable=SC2086  # DIAM, EXEC and EXTRA_2D are word lists
$CRYODASK class2d --i Import/particles.zarr --o Class2D/run --K "$K" --iter "$ITER_2D" --ctf \
  --zero_mask --flatten_solvent $DIAM $EXEC $EXTRA_2D
last=Class2D/run_it$(printf %03d "$ITER_2D")_data.star

echo "== select: classes with >= $MIN_FRACTION of the particles and <= $MAX_RESOLUTION A"
$CRYODASK select --i "$last" --min_fraction "$MIN_FRACTION" --max_resolution "$MAX_RESOLUTION" \
  --o Select/particles.star

echo "== refine3d"
# shellcheck disable=SC2086
$CRYODASK refine3d --i Select/particles.star --ref "$reference" --ini_high "$INI_HIGH" --o Refine3D/run --ctf \
  --zero_mask --flatten_solvent $DIAM $EXEC $EXTRA_3D

echo "== reports"
$CRYODASK report Class2D/run
$CRYODASK report Refine3D/run
