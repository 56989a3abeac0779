#!/usr/bin/env bash
# Install a Slurm + MUNGE that tests/test_slurm.py can start on localhost (Debian/Ubuntu, as root).
# Idempotent: does nothing when the binaries are already there. The daemons are NOT started or
# enabled here; the tests start their own from a temporary slurm.conf and stop them afterwards.
set -euo pipefail

need=()
for bin in sbatch srun scontrol scancel squeue slurmctld slurmd munged; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ] && [ -s /etc/munge/munge.key ]; then
    echo "install-test-slurm: Slurm and MUNGE already installed ($(slurmd -V))"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Keep the packages' maintainer scripts from starting the daemons (no init system in CI containers).
policy_added=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_added=1
fi
trap 'if [ "$policy_added" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi' EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge

# A MUNGE key (the munge package usually creates one; make sure).
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key
    else
        $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
$SUDO chmod 0400 /etc/munge/munge.key
echo "install-test-slurm: installed $(slurmd -V), $(munged --version 2>&1 | head -1)"
