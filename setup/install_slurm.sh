#!/usr/bin/env bash
# Install the Debian packages a local test SLURM cluster needs (slurm-wlm, munge). Idempotent: does
# nothing when they are already installed. Used by .ci/run and by tests/slurm_cluster.py.
set -euo pipefail

have_all() {
    for prog in munged slurmctld slurmd sbatch srun scontrol sinfo squeue scancel; do
        command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || return 1
    done
}

if have_all; then
    echo "slurm-wlm and munge already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_slurm.sh: need root (or sudo) to apt-get install slurm-wlm munge" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The packages' postinst scripts try to start services; there is no init system in containers, so
# tell invoke-rc.d not to start anything during the install.
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    CREATED_POLICY=1
fi
trap '[ "$CREATED_POLICY" = 1 ] && $SUDO rm -f "$POLICY"' EXIT
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null

have_all || { echo "install_slurm.sh: slurm-wlm/munge installed but programs still missing" >&2; exit 1; }
echo "installed slurm-wlm and munge"
