#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` and for trying
# `ncsn-train -m hydra/launcher=slurm ...` without a cluster. Run as root:
#
#     sudo scripts/slurm_local.sh          # installs slurm-wlm and munge once, then starts them
#
# Debian's packages; munge authenticates, slurmctld and slurmd run as root on localhost.
# No systemd and cgroup v1 only on these machines: slurmd starts with cgroup/v1 without
# automounting, Linux /proc process tracking and no task plugin. Idempotent: when `sinfo`
# already shows the node up, it returns at once.
set -euo pipefail

node_up() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

if command -v sinfo >/dev/null && node_up; then
    echo "slurm_local: the cluster is up"; sinfo; exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm_local: run as root (it installs packages and starts slurmctld/slurmd)" >&2; exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# Munge: one key, readable by munge only.
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
[ -s /etc/munge/munge.key ] ||
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
munge -n | unmunge >/dev/null

# One node: this host, all its CPUs, its memory less 1 GiB for the daemons.
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobRequeue=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
DefMemPerCPU=$(( mem_mb / cpus ))
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/cgroup.conf <<EOF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
IgnoreSystemd=yes
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    if node_up; then echo "slurm_local: the cluster is up"; sinfo; exit 0; fi
    scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm_local: the node did not become idle; see /var/log/slurm/slurm{d,ctld}.log" >&2
sinfo -N -l >&2 || true
exit 1
