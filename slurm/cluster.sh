#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine (slurmctld + slurmd + munged) for tests and CI:
# one node by default, or N namespaced nodes node1..nodeN with --nodes N.
#
#   slurm/cluster.sh up DIR [options]              start it, all state under DIR
#       --cpus N        CPUs per node (default: what slurmd -C finds)
#       --mem-mb MB     memory per node (default: 90 % of the machine, split over the nodes)
#       --gpus N        fake GPUs per node (empty files in DIR/dev that SLURM schedules as gpu gres)
#       --name NAME     ClusterName (default: medflowtest)
#       --nodes N       N nodes, each in its own network/UTS/mount namespace on a host bridge
#       --share PATH    (with --nodes; repeatable) bind this host /tmp path into every node's private
#                       /tmp (made if missing); DIR and this checkout (with the venv its .venv links to)
#                       are always shared, so jobs find medflow wherever it was cloned; paths outside
#                       /tmp are shared anyway
#       --no-dns        (with --nodes) node names resolve nowhere; SLURM still works through NodeAddr
#   slurm/cluster.sh env DIR                       print `export ...` lines to use it
#   slurm/cluster.sh status DIR                    sinfo + squeue (+ the nodes' addresses)
#   slurm/cluster.sh down DIR                      cancel jobs, stop daemons, remove what up made
#   slurm/cluster.sh exec DIR nodeK CMD...         run CMD in nodeK's namespaces (as its jobs see them)
#   slurm/cluster.sh kill-node DIR nodeK           SIGKILL nodeK's slurmd and all its processes; link down
#   slurm/cluster.sh revive-node DIR nodeK         link up, restart its slurmd (ReturnToService=2)
#   slurm/cluster.sh shape DIR RATE|none           tc tbf RATE (1gbit, 10gbit, ...) on every node link
#
# Needs root and Debian's slurm-wlm (22.05) + munge (containers/install.sh installs them).
# DIR holds config, munge key/socket, state, spool, logs, pid files and what `down` must undo.
# DIR/bin holds SLURM_CONF-aware wrappers of the SLURM client commands; put it first on PATH.
# They are needed because snakemake-executor-plugin-slurm-jobstep strips every SLURM_*
# variable (SLURM_CONF included) before the `srun` inside a job.
#
# Facts this relies on (measured on Debian 12): munged wants a 0400 root key, a socket
# directory executable by all and no group/world-writable directory on its paths; slurm finds a
# non-default munge socket through AuthInfo=socket=...; NodeName must be `hostname -s`;
# proctrack/linuxproc + task/none need no cgroups; CR_Core_Memory needs DefMemPerCPU or the
# first job takes all memory; batch_sched_delay=0 starts jobs in ~0.3 s; without slurmdbd plain
# `sacct` fails, so jobs stay visible to squeue for MinJobAge=300 s and finished jobs are logged
# by jobcomp/filetxt (read with `sacct -c`).
#
# Multi-node mode (--nodes N), on one machine:
# - network: bridge mfbrI with 10.213.I.1/24 on the host (I = first free index 1..254, claimed by
#   creating the bridge, so two clusters never share one); nodeK is netns medflowI-nodeK with
#   eth0 = 10.213.I.(10+K) on a veth pair (host end mfInK) and a default route via the host.
#   slurmctld and munged run on the host (SlurmctldHost=<host>(10.213.I.1)); munged's socket in
#   DIR reaches the nodes through the file system.
# - each slurmd runs as `nsenter --net=<netns> unshare --uts --mount --propagation private`, then
#   sets its hostname and mounts, in its own mount namespace: a private tmpfs on /tmp (a shared
#   /tmp breaks PMIx: "Cannot create directory /tmp/spmix_appdir_...: File exists") with DIR and
#   each --share path bound back from the host's /tmp; a private /dev/shm; DIR/etc/hosts on
#   /etc/hosts (all nodes + controller, or only localhost with --no-dns) and a resolv.conf without
#   servers (unknown names fail at once instead of timing out). `ip netns exec` is not used: it
#   remounts /sys and slurmd then fails "Unable to initialize cgroup plugin".
# - DIR/run/net.env and DIR/run/nodes.tsv record every namespace, link and bridge before it is
#   made; `down` undoes exactly those (twice is harmless) and drops the records when done.
set -euo pipefail

SBIN=${SLURM_SBIN:-/usr/sbin}
CLIENTS=(srun sbatch salloc squeue scancel scontrol sinfo sacct sstat sprio sshare sacctmgr)
SELF=$(readlink -f "${BASH_SOURCE[0]}")
NET_PREFIX=10.213                 # multi-node clusters use NET_PREFIX.I.0/24
RUN_ROOT=/run/medflow-cluster     # host-side mount points the nodes need (outside every /tmp)
MAX_NODES=200                     # node addresses .11 ... .210

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() {  # the header down to its second bare '#' line
  awk 'NR > 1 && /^#$/ && ++n == 2 {exit} NR > 1' "$SELF" | sed 's/^# \{0,1\}//'; exit 2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

conf_of() { echo "$1/etc/slurm.conf"; }

detected() {  # detected CPUs|RealMemory: what slurmd -C finds on this machine
  "$SBIN/slurmd" -C | head -1 | sed -n "s/.*$1=\([0-9]*\).*/\1/p"
}

node_line() {
  # CPU count and memory as slurmd sees them; --cpus/--mem-mb override them (oversubscribed test node).
  local cpus=$1 mem=$2 share=${3:-1}
  [ -n "$cpus" ] || cpus=$(detected CPUs)
  if [ -z "$mem" ]; then
    # Keep 10 % for the OS; without config_overrides slurmd refuses more than it finds.
    mem=$(detected RealMemory)
    mem=$((mem * 9 / 10 / share))
  fi
  echo "$cpus $mem"
}

write_wrappers() {
  local dir=$1 conf=$2 name real
  mkdir -p "$dir/bin"
  for name in "${CLIENTS[@]}"; do
    real=$(command -v "/usr/bin/$name" || true)
    [ -n "$real" ] || continue
    cat >"$dir/bin/$name" <<EOF
#!/bin/sh
# $name for the throw-away cluster in $dir (SLURM_CONF survives the jobstep plugin this way).
SLURM_CONF=\${SLURM_CONF:-$conf}
export SLURM_CONF
exec $real "\$@"
EOF
    chmod 0755 "$dir/bin/$name"
  done
}

fake_gpus() {  # fake_gpus DIR GPUS NODENAMES: DIR/etc/gres.conf and the empty device files
  local dir=$1 gpus=$2 nodes=$3 i
  ((gpus > 0)) || return 0
  # Fake GPUs: slurmd drops file-less GPUs, so empty files stand in for /dev/nvidiaN. SLURM then
  # schedules --gpus/--gres/--ntasks-per-gpu for real (and sets CUDA_VISIBLE_DEVICES); no GPU needed.
  mkdir -p "$dir/dev"
  for ((i = 0; i < gpus; i++)); do : >"$dir/dev/gpu$i"; done
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/dev/gpu[0-%d]\n' "$nodes" "$dir" "$((gpus - 1))" >"$dir/etc/gres.conf"
}

write_config() {  # the one-node cluster's slurm.conf
  local dir=$1 cpus=$2 name=$3 gpus=$4 mem=$5 host ctld_port slurmd_port overrides="" gres="" gres_types=""
  host=$(hostname -s)
  if [ -n "$mem" ] || { [ -n "$cpus" ] && [ "$cpus" != "$(detected CPUs)" ]; }; then
    overrides="SlurmdParameters=config_overrides"
  fi
  read -r cpus mem < <(node_line "$cpus" "$mem")
  ctld_port=$(free_port); slurmd_port=$(free_port)
  if ((gpus > 0)); then
    gres_types="GresTypes=gpu"; gres="Gres=gpu:$gpus"
    fake_gpus "$dir" "$gpus" "$host"
  fi
  cat >"$dir/etc/slurm.conf" <<EOF
# generated by slurm/cluster.sh for a throw-away test cluster; do not use in production
ClusterName=$name
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
$(common_config "$dir" "$((mem / cpus))" slurmd)
$overrides
$gres_types
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  : >"$dir/etc/plugstack.conf"
}

common_config() {  # common_config DIR DEF_MEM_PER_CPU SLURMD_FILE_STEM [AUTHINFO_MORE [SCHEDULER_MORE]]
  local dir=$1 defmem=$2 stem=$3 auth_more=${4:-} sched_more=${5:-} spool
  spool=$dir/spool
  [ "$stem" = slurmd ] || spool=$dir/spool/%n  # one spool directory per node
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2$auth_more
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/$stem.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/$stem.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000$sched_more
MpiDefault=pmix
MinJobAge=300
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
PlugStackConfig=$dir/etc/plugstack.conf
MaxArraySize=1001
EOF
}

start_munge() {
  local dir=$1
  # munged: root-owned 0400 key; socket dir 0755 (clients must traverse it). --force lets it start
  # when a parent directory is private (pytest's 0700 tmp dirs): every client here runs as root.
  dd if=/dev/urandom of="$dir/etc/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$dir/etc/munge.key"
  chmod 0755 "$dir/munge"
  "$SBIN/munged" --force --key-file="$dir/etc/munge.key" --socket="$dir/munge/munge.socket.2" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 t=0; shift 2
  until "$@" >/dev/null 2>&1; do
    sleep 0.1; t=$((t + 1))
    ((t < limit * 10)) || return 1
  done
  [ -n "$what" ] || true
}

nodes_ready() {  # nodes_ready DIR [COUNT [NODE]]: COUNT nodes (default 1) idle, mixed or allocated
  local dir=$1 want=${2:-1} node=${3:-} ready
  ready=$("$dir/bin/sinfo" -h -N ${node:+-n "$node"} -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)$/' | sort -u | wc -l)
  ((ready >= want))
}

node_ready() { nodes_ready "$1" 1; }

start_controller() {  # start_controller DIR: slurmctld on the host, answering pings
  local dir=$1
  "$SBIN/slurmctld" -c -f "$(conf_of "$dir")" || die "slurmctld failed; see $dir/log/slurmctld.log"
  wait_for 20 slurmctld "$dir/bin/scontrol" ping || die "slurmctld not answering; see $dir/log/slurmctld.log"
}

cmd_up() {
  local dir="" cpus="" mem="" gpus=0 name="medflowtest" nodes="" dns=1 shares=()
  while (($#)); do
    case $1 in
      --cpus) cpus=$2; shift 2 ;;
      --gpus) gpus=$2; shift 2 ;;
      --mem-mb) mem=$2; shift 2 ;;
      --name) name=$2; shift 2 ;;
      --nodes) nodes=$2; shift 2 ;;
      --share) shares+=("$2"); shift 2 ;;
      --no-dns) dns=0; shift ;;
      -*) die "unknown option $1" ;;
      *) dir=$1; shift ;;
    esac
  done
  [ -n "$dir" ] || usage
  if [ -z "$nodes" ]; then
    { ((${#shares[@]} == 0)) && ((dns)); } || die "--share and --no-dns need --nodes"
  else
    [[ $nodes =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= MAX_NODES)) || die "--nodes wants 1..$MAX_NODES"
    [[ $cpus$mem =~ ^[0-9]*$ && $gpus =~ ^[0-9]+$ ]] && [ "${cpus:-1}" -gt 0 ] && [ "${mem:-1}" -gt 0 ] ||
      die "--cpus and --mem-mb want positive numbers, --gpus a count"
  fi
  [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their owner)"
  for exe in slurmctld slurmd munged; do [ -x "$SBIN/$exe" ] || die "$SBIN/$exe missing: apt-get install slurm-wlm munge"; done
  [ ! -e "$dir/run/slurmctld.pid" ] && [ ! -e "$dir/run/net.env" ] || die "$dir already holds a cluster (run: $0 down $dir)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # No group/world-writable directory on munged's or slurm's paths.
  chmod 0755 "$dir"
  mkdir -p "$dir"/{etc,munge,state,spool,log,run}
  chmod 0755 "$dir"/{etc,munge,state,spool,log,run}
  # A failed bring-up stops whatever it started (and removes what it recorded in DIR/run).
  UP_DIR=$dir
  trap 'cmd_down "$UP_DIR" >/dev/null 2>&1' EXIT
  trap 'exit 130' INT TERM
  if [ -n "$nodes" ]; then
    up_multi "$dir" "$nodes" "$cpus" "$mem" "$gpus" "$name" "$dns" ${shares[@]+"${shares[@]}"}
    trap - EXIT INT TERM
    return 0
  fi
  write_config "$dir" "$cpus" "$name" "$gpus" "$mem"
  write_wrappers "$dir" "$(conf_of "$dir")"
  start_munge "$dir"
  wait_for 10 munge test -S "$dir/munge/munge.socket.2" || die "munged did not start; see $dir/log/munged.log"
  export SLURM_CONF=$dir/etc/slurm.conf
  start_controller "$dir"
  "$SBIN/slurmd" -f "$SLURM_CONF" || die "slurmd failed; see $dir/log/slurmd.log"
  wait_for 30 slurmd node_ready "$dir" || {
    "$dir/bin/scontrol" show node >&2 || true
    die "node did not become idle; see $dir/log/slurmd.log"
  }
  trap - EXIT INT TERM
  echo "cluster '$name' up in $dir (SLURM_CONF=$SLURM_CONF)"
}

# --------------------------------------------------------------------------- multi-node mode

load_net() {  # load_net DIR: IDX BRIDGE SUBNET HOST_IP STASH NODES DNS from DIR/run/net.env; 1 if none
  local file=$1/run/net.env
  [ -f "$file" ] || return 1
  # shellcheck disable=SC1090
  . "$file"
}

node_row() {  # node_row DIR nodeK: "NETNS VETH IP" of that node (from DIR/run/nodes.tsv)
  local row
  row=$(awk -v n="$2" '$1 == n {print $2, $3, $4}' "$1/run/nodes.tsv" 2>/dev/null)
  [ -n "$row" ] || die "no node $2 in the cluster in $1"
  echo "$row"
}

subnet_free() {  # subnet_free I: nothing on this machine uses NET_PREFIX.I.0/24 or cluster I's names
  local i=$1 routes links
  # Routes inside the /24 or covering it (the default route aside).
  routes=$(ip -4 route show root "$NET_PREFIX.$i.0/24"; ip -4 route show match "$NET_PREFIX.$i.0/24" | grep -v '^default' || true)
  [ -z "$routes" ] || return 1
  ! ls /run/netns/"medflow$i-"* >/dev/null 2>&1 || return 1
  links=$(ip -o link show)
  ! grep -q ": mf${i}n[0-9]*[@:]" <<<"$links" || return 1
}

claim_network() {  # claim_network DIR NODES DNS: pick a free index; its bridge is the claim
  local dir=$1 nodes=$2 dns=$3 i
  for ((i = 1; i <= 254; i++)); do
    subnet_free "$i" || continue
    # `ip link add` fails if another cluster created this bridge first: that makes the claim atomic.
    ip link add "mfbr$i" type bridge 2>/dev/null || continue
    cat >"$dir/run/net.env" <<EOF
IDX=$i
BRIDGE=mfbr$i
SUBNET=$NET_PREFIX.$i
HOST_IP=$NET_PREFIX.$i.1
STASH=$RUN_ROOT/$i
NODES=$nodes
DNS=$dns
EOF
    return 0
  done
  die "no free subnet $NET_PREFIX.1-254.0/24"
}

setup_bridge() {
  local dir=$1
  load_net "$dir"
  ip addr add "$HOST_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" type bridge stp_state 0 forward_delay 0
  ip link set "$BRIDGE" up
  mkdir -p "$STASH/hosttmp"
  # `ip netns add` turns /run/netns into a mount point; the last cluster down removes it again.
  if ! mountpoint -q /run/netns; then touch "$RUN_ROOT/netns-mount"; fi
}

add_node() {  # add_node DIR K: netns + veth (host end on the bridge) + address for nodeK
  local dir=$1 k=$2 ns veth ip
  load_net "$dir"
  ns=medflow$IDX-node$k; veth=mf${IDX}n$k; ip=$SUBNET.$((10 + k))
  printf 'node%s\t%s\t%s\t%s\n' "$k" "$ns" "$veth" "$ip" >>"$dir/run/nodes.tsv"  # recorded before it exists
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  # A default route as on a real node (e.g. the UDP-connect trick to find one's own address works);
  # the host does not forward, so nothing leaves the cluster.
  ip -n "$ns" route add default via "$HOST_IP"
}

write_node_files() {  # write_node_files DIR: the nodes' /etc/hosts, resolv.conf and shared paths
  local dir=$1 k path
  shift
  load_net "$dir"
  {
    echo "# /etc/hosts of the nodes of the throw-away cluster in $dir"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    if ((DNS)); then
      printf '%s\t%s\n' "$HOST_IP" "$(hostname -s)"
      for ((k = 1; k <= NODES; k++)); do printf '%s\tnode%s\n' "$SUBNET.$((10 + k))" "$k"; done
    fi
  } >"$dir/etc/hosts"
  # No nameserver: glibc then asks 127.0.0.1:53 in the node, which refuses at once. The host's
  # server is unreachable from a node and would make every unknown name wait for its timeout.
  printf '# resolv.conf of the nodes of the throw-away cluster in %s: names come from /etc/hosts only\noptions attempts:1 timeout:1\n' \
    "$dir" >"$dir/etc/resolv.conf"
  # Paths under /tmp to bind back into the nodes' private /tmp: DIR, this checkout and its venv (the
  # jobs run medflow from them) and every --share (made if missing, so a test can share its base
  # directory before creating its working directories).
  local checkout venv=()
  checkout=$(dirname "$(dirname "$SELF")")
  [ ! -e "$checkout/.venv" ] || venv=("$(readlink -f "$checkout/.venv")")
  for path in "$dir" "$checkout" ${venv[@]+"${venv[@]}"} "$@"; do
    mkdir -p "$path"
    path=$(readlink -f "$path")
    [ "$path" != /tmp ] || die "--share /tmp would give the nodes one /tmp again (PMIx needs a private one)"
    case $path in /tmp/*) echo "$path" ;; esac
  done | sort -u | awk '{ for (i = 1; i <= n; i++) if (index($0, kept[i] "/") == 1) next; kept[++n] = $0; print }' \
    >"$dir/run/shares"
}

write_multi_config() {  # write_multi_config DIR NODES CPUS MEM GPUS NAME
  local dir=$1 nodes=$2 cpus=$3 mem=$4 gpus=$5 name=$6 k gres="" gres_types=""
  load_net "$dir"
  read -r cpus mem < <(node_line "$cpus" "$mem" "$nodes")
  if ((gpus > 0)); then
    gres_types="GresTypes=gpu"; gres="Gres=gpu:$gpus"
    fake_gpus "$dir" "$gpus" "node[1-$nodes]"
  fi
  {
    cat <<EOF
# generated by slurm/cluster.sh for a throw-away $nodes-node test cluster; do not use in production
ClusterName=$name
SlurmctldHost=$(hostname -s)($HOST_IP)
SlurmctldPort=$(free_port)
SlurmdPort=6818
$(common_config "$dir" "$((mem / cpus))" "slurmd-%n" ",cred_expire=20" ",bf_interval=5")
# Declared CPUs/memory are fake (all nodes share this machine's cores).
SlurmdParameters=config_overrides
# Node failure, fast: slurmctld pings every SlurmdTimeout/3 and a ping to a dead node waits up to
# MessageTimeout; a node silent for SlurmdTimeout is set DOWN and its batch jobs are requeued
# (JobRequeue=1: unless --no-requeue) and killed on the other nodes (SIGKILL KillWait after
# SIGTERM). A requeued job is held for cred_expire+1 s (AuthInfo above; default 120 s) so old
# step credentials lapse; then the backfill pass (bf_interval above; default 30 s) starts it.
# A revived slurmd returns the node to service (ReturnToService=2 above).
SlurmdTimeout=10
MessageTimeout=5
JobRequeue=1
KillWait=5
$gres_types
EOF
    for ((k = 1; k <= nodes; k++)); do
      echo "NodeName=node$k NodeAddr=$SUBNET.$((10 + k)) CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } >"$dir/etc/slurm.conf"
  : >"$dir/etc/plugstack.conf"
}

node_pid() {  # node_pid DIR nodeK: pid of its running slurmd; status 1 if none runs
  local pid
  pid=$(cat "$1/run/slurmd-$2.pid" 2>/dev/null || true)
  [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

start_node() {  # start_node DIR nodeK: its slurmd in fresh UTS + mount namespaces inside its netns
  local dir=$1 node=$2 ns veth ip row
  row=$(node_row "$dir" "$node"); read -r ns veth ip <<<"$row"
  rm -f "$dir/run/slurmd-$node.pid"
  mkdir -p "$dir/spool/$node"
  # No process of this node runs now (fresh, or after kill-node): what killed slurmstepds left in
  # the spool would fail the requeued job's steps ("Cannot bind() UNIX socket .../stepd.slurm.pmix.J.S",
  # "Cannot create directory .../pmix.J.S/: File exists"). cred_state (revoked credentials) stays.
  find "$dir/spool/$node" -mindepth 1 -maxdepth 1 \( -type s -o -name 'pmix.*' \) -exec rm -rf {} +
  # nsenter and unshare exec (no fork); slurmd daemonizes, so this returns once it runs.
  nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
    bash "$SELF" _node-init "$dir" "$node" >>"$dir/log/$node-init.log" 2>&1 ||
    die "$node did not start; see $dir/log/$node-init.log and $dir/log/slurmd-$node.log"
  wait_for 10 "" node_pid "$dir" "$node" || die "$node: no slurmd; see $dir/log/slurmd-$node.log"
}

node_init() {  # node_init DIR nodeK: inside the node's new namespaces; becomes its slurmd
  local dir=$1 node=$2 path shares=()
  cd /
  load_net "$dir"
  mapfile -t shares <"$dir/run/shares"  # read now: DIR may be under /tmp, hidden in a moment
  hostname "$node"
  # The host's /tmp stays reachable through STASH while the private tmpfs covers /tmp, so the
  # shared paths can be bound back; then STASH goes, and with it the rest of the host's /tmp.
  mount --bind /tmp "$STASH/hosttmp"
  mount -t tmpfs -o mode=1777 "tmp-$node" /tmp
  for path in ${shares[@]+"${shares[@]}"}; do
    mkdir -p "$path"
    mount --bind "$STASH/hosttmp/${path#/tmp/}" "$path"
  done
  umount "$STASH/hosttmp"
  mount -t tmpfs -o mode=1777 "shm-$node" /dev/shm
  mount --bind "$dir/etc/hosts" /etc/hosts
  mount --bind "$dir/etc/resolv.conf" /etc/resolv.conf
  exec "$SBIN/slurmd" -f "$(conf_of "$dir")" -N "$node"
}

up_multi() {  # up_multi DIR NODES CPUS MEM GPUS NAME DNS [SHARE...]
  local dir=$1 nodes=$2 cpus=$3 mem=$4 gpus=$5 name=$6 dns=$7 k
  shift 7
  : >"$dir/run/nodes.tsv"
  mkdir -p "$RUN_ROOT"
  claim_network "$dir" "$nodes" "$dns"
  setup_bridge "$dir"
  for ((k = 1; k <= nodes; k++)); do add_node "$dir" "$k"; done
  write_node_files "$dir" "$@"
  write_multi_config "$dir" "$nodes" "$cpus" "$mem" "$gpus" "$name"
  write_wrappers "$dir" "$(conf_of "$dir")"
  start_munge "$dir"
  wait_for 10 munge test -S "$dir/munge/munge.socket.2" || die "munged did not start; see $dir/log/munged.log"
  export SLURM_CONF=$dir/etc/slurm.conf
  start_controller "$dir"
  for ((k = 1; k <= nodes; k++)); do start_node "$dir" "node$k"; done
  wait_for 30 slurmd nodes_ready "$dir" "$nodes" || {
    "$dir/bin/sinfo" -N >&2 || true
    die "not all $nodes nodes became idle; see $dir/log/slurmd-node*.log"
  }
  load_net "$dir"
  echo "cluster '$name' up in $dir: $nodes nodes on $BRIDGE $SUBNET.0/24 (SLURM_CONF=$SLURM_CONF)"
}

kill_netns_procs() {  # kill_netns_procs NETNS: SIGKILL every process in it until none is left
  local ns=$1 pids t=0
  [ -e "/run/netns/$ns" ] || return 0
  while pids=$(ip netns pids "$ns" 2>/dev/null) && [ -n "$pids" ] && ((t < 100)); do
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1; t=$((t + 1))
  done
}

unshape_node() {  # unshape_node NETNS VETH: remove the tbf qdiscs on both ends of a node link
  tc qdisc del dev "$2" root 2>/dev/null || true
  [ -e "/run/netns/$1" ] && tc -n "$1" qdisc del dev eth0 root 2>/dev/null || true
}

down_multi() {  # down_multi DIR: stop the nodes, remove what DIR/run records, then the records
  local dir=$1 node ns veth ip pidfiles
  load_net "$dir" || return 0
  [ -f "$dir/run/nodes.tsv" ] || : >"$dir/run/nodes.tsv"
  if [ -s "$dir/run/nodes.tsv" ]; then
    mapfile -t pidfiles < <(awk -v d="$dir" '{print d "/run/slurmd-" $1 ".pid"}' "$dir/run/nodes.tsv")
    stop_pid "${pidfiles[@]}"
    while read -r node ns veth ip; do
      kill_netns_procs "$ns"  # job steps left over, `exec` commands
    done <"$dir/run/nodes.tsv"
    while read -r node ns veth ip; do
      unshape_node "$ns" "$veth"
      ip link del "$veth" 2>/dev/null || true  # takes its peer (the node's eth0) along
      [ ! -e "/run/netns/$ns" ] || ip netns del "$ns" || true
    done <"$dir/run/nodes.tsv"
  fi
  ! ip link show "$BRIDGE" >/dev/null 2>&1 || ip link del "$BRIDGE" || true
  rmdir "$STASH/hosttmp" "$STASH" 2>/dev/null || true
  if [ -e "$RUN_ROOT/netns-mount" ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns 2>/dev/null || true
    rm -f "$RUN_ROOT/netns-mount"
  fi
  rmdir "$RUN_ROOT" 2>/dev/null || true
  # Forget the index only once all is gone (else a second `down` retries): another cluster may
  # then reuse it, and a later `down` of this DIR must not touch that one.
  local left=0
  ! ip link show "$BRIDGE" >/dev/null 2>&1 || left=1
  while read -r node ns veth ip; do [ ! -e "/run/netns/$ns" ] || left=1; done <"$dir/run/nodes.tsv"
  ((left)) || rm -f "$dir/run/net.env" "$dir/run/nodes.tsv"
}

cmd_exec() {
  local dir=${1:-} node=${2:-} pid
  [ -n "$dir" ] && [ -n "$node" ] && (($# > 2)) || usage
  shift 2
  node_row "$dir" "$node" >/dev/null
  pid=$(node_pid "$dir" "$node") || die "$node is down (revive-node first)"
  # Entering a mount namespace resets the working directory to /; keep the caller's where the node
  # sees it (shared file system or a shared /tmp path).
  exec nsenter -t "$pid" -n -u -m -- sh -c 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"' sh "$PWD" "$@"
}

cmd_kill_node() {
  local dir=${1:-} node=${2:-} ns veth ip pid row
  [ -n "$dir" ] && [ -n "$node" ] || usage
  row=$(node_row "$dir" "$node"); read -r ns veth ip <<<"$row"
  if pid=$(node_pid "$dir" "$node"); then kill -KILL "$pid" 2>/dev/null || true; fi
  kill_netns_procs "$ns"  # slurmstepd, job steps, anything `exec` started there
  ip link set "$veth" down
  echo "$node killed (slurmd and all its processes; link $veth down)"
}

cmd_revive_node() {
  local dir=${1:-} node=${2:-} ns veth ip row
  [ -n "$dir" ] && [ -n "$node" ] || usage
  dir=$(cd "$dir" && pwd)
  row=$(node_row "$dir" "$node"); read -r ns veth ip <<<"$row"
  ! node_pid "$dir" "$node" >/dev/null || die "$node is running"
  ip link set "$veth" up
  kill_netns_procs "$ns"  # nothing should be left, but a new slurmd must not meet old steps
  start_node "$dir" "$node"
  if wait_for 30 "" nodes_ready "$dir" 1 "$node"; then
    echo "$node revived: $("$dir/bin/sinfo" -h -N -n "$node" -o %t)"
  else
    echo "$node: slurmd runs but the node is $("$dir/bin/sinfo" -h -N -n "$node" -o %t) (see scontrol show node $node)"
  fi
}

tbf_args() {  # tbf_args RATE: "rate RATE burst B latency 50ms" with a burst of ~4 ms at that rate
  local bytes
  bytes=$(awk -v r="$1" 'BEGIN {
    if (!match(r, /^[0-9.]+/)) exit 1
    n = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    m["bit"] = 1 / 8; m["kbit"] = 1e3 / 8; m["mbit"] = 1e6 / 8; m["gbit"] = 1e9 / 8; m["tbit"] = 1e12 / 8
    m["bps"] = 1; m["kbps"] = 1e3; m["mbps"] = 1e6; m["gbps"] = 1e9
    if (!(u in m)) exit 1
    b = n * m[u] / 250; if (b < 16384) b = 16384
    printf "%d", b }') || die "rate $1: want e.g. 100mbit, 1gbit, 25gbit or none"
  echo "rate $1 burst $bytes latency 50ms"
}

cmd_shape() {
  local dir=${1:-} rate=${2:-} node ns veth ip args=""
  [ -n "$dir" ] && [ -n "$rate" ] || usage
  load_net "$dir" || die "no multi-node cluster in $dir"
  [ "$rate" = none ] || args=$(tbf_args "$rate")
  while read -r node ns veth ip; do
    if [ "$rate" = none ]; then
      unshape_node "$ns" "$veth"
    else
      # Both ends: the host end shapes traffic into the node, the node's eth0 traffic out of it.
      # shellcheck disable=SC2086
      tc qdisc replace dev "$veth" root tbf $args
      # shellcheck disable=SC2086
      tc -n "$ns" qdisc replace dev eth0 root tbf $args
    fi
  done <"$dir/run/nodes.tsv"
  echo "node links: ${args:-unshaped}"
}

# --------------------------------------------------------------------------- both modes

alive() {  # alive PID...: one of them runs (a zombie does not: kill -0 succeeds until init reaps it)
  local states
  states=$(ps -o stat= -p "$(IFS=,; echo "$*")" 2>/dev/null) || return 1
  grep -qv '^Z' <<<"$states"
}

stop_pid() {  # stop_pid PIDFILE...: TERM those pids, wait up to 10 s, then KILL; only those pids
  local file pid pids=() t=0
  for file in "$@"; do
    [ -f "$file" ] || continue
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  # Together: a slurmd takes ~2 s to exit, so N nodes stop in 2 s rather than 2N.
  while ((${#pids[@]})) && alive "${pids[@]}" && ((t < 100)); do sleep 0.1; t=$((t + 1)); done
  ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
  rm -f "$@"
}

cmd_down() {
  local dir=${1:-}; [ -n "$dir" ] || usage
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  if [ -x "$dir/bin/scancel" ] && [ -f "$dir/run/slurmctld.pid" ]; then
    # Cancel every job first so slurmstepd and job processes go away with their daemons.
    "$dir/bin/scancel" --full --quiet --user=root 2>/dev/null || true
    local t=0
    while [ -n "$("$dir/bin/squeue" -h -t running,completing -o %i 2>/dev/null)" ] && ((t < 100)); do
      sleep 0.1; t=$((t + 1))
    done
  fi
  down_multi "$dir"
  stop_pid "$dir/run/slurmd.pid"
  stop_pid "$dir/run/slurmctld.pid"
  stop_pid "$dir/run/munged.pid"
  echo "cluster in $dir down"
}

cmd_env() {
  local dir=${1:-}; [ -n "$dir" ] || usage
  dir=$(cd "$dir" && pwd)
  [ -f "$dir/etc/slurm.conf" ] || die "no cluster in $dir"
  echo "export SLURM_CONF=$dir/etc/slurm.conf"
  echo "export PATH=$dir/bin:\$PATH"
}

cmd_status() {
  local dir=${1:-}; [ -n "$dir" ] || usage
  "$dir/bin/sinfo" && "$dir/bin/squeue"
  if [ -f "$dir/run/nodes.tsv" ]; then
    local node ns veth ip
    while read -r node ns veth ip; do
      echo "$node $ip netns=$ns link=$veth slurmd=$(node_pid "$dir" "$node")"
    done <"$dir/run/nodes.tsv"
  fi
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  env) shift; cmd_env "$@" ;;
  status) shift; cmd_status "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  kill-node) shift; cmd_kill_node "$@" ;;
  revive-node) shift; cmd_revive_node "$@" ;;
  shape) shift; cmd_shape "$@" ;;
  _node-init) shift; node_init "$@" ;;  # internal: run by start_node inside a node's namespaces
  *) usage ;;
esac
