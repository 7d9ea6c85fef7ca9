#!/bin/bash
# Boot the cached Debian root (build_rootfs.sh) with systemd-nspawn, on a
# host whose PID 1 is not systemd.
#
# Usage: nspawn_boot.sh start STATE_DIR | exec STATE_DIR CMD... | stop STATE_DIR
#   env: FORKSERVER_E2E_ROOTFS (default /var/tmp/forkserver-e2e/rootfs)
#
# The container shares the host's network namespace, so the host reaches
# the ports systemd binds inside on 127.0.0.1.  The repository is bound
# read-only at /media/forkserver-source; the test installs from a copy of
# it, as systemd/README.md says.
# --volatile=overlay: every change inside lands on a tmpfs and is gone
# at power-off; the cached root stays pristine.
#
# The cgroup rule: a service manager must never run outside a container
# of its own, or it moves the host's processes into its cgroups.  nspawn
# gives it its own PID namespace and its own cgroup subtree, which this
# script creates (forkserver-e2e-*) and removes on stop.
set -euo pipefail

ROOTFS=${FORKSERVER_E2E_ROOTFS:-/var/tmp/forkserver-e2e/rootfs}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HIER="/sys/fs/cgroup/systemd /sys/fs/cgroup/unified"
cmd=${1:-}
W=${2:?usage: $0 start|exec|stop STATE_DIR ...}
# Also the machine name, which allows only letters, digits and "-", and
# must not end in "-" (mkdtemp's suffix may end in "_").
CG=forkserver-e2e-$(basename "$W" | tr -c "a-zA-Z0-9\n" "-" | tr -s "-" | sed 's/-*$//')
leader() { cat "$W/leader"; }

# The host's CA bundle: pip inside reaches PyPI through whatever the host
# trusts (a TLS-inspecting proxy, say); Debian's pip reads this file.
BUNDLE=/etc/ssl/certs/ca-certificates.crt
TRUST=""
[ -f "$BUNDLE" ] && TRUST="--bind-ro=$BUNDLE"

case "$cmd" in
start)
  mkdir -p "$W"
  for h in $HIER; do [ -d "$h" ] && mkdir -p "$h/$CG"; done
  # nspawn keeps state in /run/systemd/nspawn and refuses to clean it up
  # when /run is not a tmpfs: give it a private tmpfs in its own mount
  # namespace.  --register=no --keep-unit: no machined or system bus here.
  setsid bash -c '
    for h in '"$HIER"'; do [ -d "$h/'"$CG"'" ] && echo $$ > "$h/'"$CG"'/cgroup.procs"; done
    exec unshare --mount --propagation private bash -c "
      mkdir -p /run/systemd && mount -t tmpfs -o mode=755 fse2e /run/systemd &&
      exec systemd-nspawn --quiet --register=no --keep-unit --boot --console=pipe \
        --directory='"$ROOTFS"' --volatile=overlay --machine='"$CG"' \
        --bind-ro='"$REPO"':/media/forkserver-source '"$TRUST"'"
  ' > "$W/nspawn.log" 2>&1 < /dev/null &
  echo $! > "$W/nspawn.pid"
  for _ in $(seq 600); do
    kill -0 "$(cat "$W/nspawn.pid")" 2>/dev/null || { echo "nspawn exited:" >&2; cat "$W/nspawn.log" >&2; exit 1; }
    # The container's init: a process named systemd whose parent is systemd-nspawn.
    L=$(for p in $(pgrep -x systemd || true); do
          [ "$(ps -o comm= -p "$(ps -o ppid= -p "$p" | tr -d ' ')" 2>/dev/null)" = systemd-nspawn ] && echo "$p"
        done | head -1)
    if [ -n "$L" ] && [ "$(ps -o ppid= -p "$L" | tr -d ' ')" != "" ]; then
      echo "$L" > "$W/leader"
      st=$(nsenter -t "$L" -a systemctl is-system-running 2>/dev/null || true)
      case "$st" in running|degraded) echo "booted: init $L ($st)"; exit 0;; esac
    fi
    sleep 0.1  # sleep-ok: boot has no event the host can wait on; bounded by the loop
  done
  echo "the container did not finish booting in 60 s" >&2
  cat "$W/nspawn.log" >&2
  exit 1
  ;;
exec)
  shift 2
  exec nsenter -t "$(leader)" -a "$@"
  ;;
stop)
  P=$(cat "$W/nspawn.pid" 2>/dev/null || true)
  if [ -n "$P" ] && kill -0 "$P" 2>/dev/null; then
    [ -f "$W/leader" ] && nsenter -t "$(leader)" -a systemctl poweroff 2>/dev/null || kill -TERM "$P"
    for _ in $(seq 300); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done  # sleep-ok: bounded
    kill -0 "$P" 2>/dev/null && kill -KILL "$P"
  fi
  # Whatever is left in our subtree goes back to the root cgroup, then the
  # subtree is removed: the host's cgroups are as they were.
  for h in $HIER; do
    [ -d "$h/$CG" ] || continue
    find "$h/$CG" -depth -type d | while read -r d; do
      while read -r p; do [ -n "$p" ] && echo "$p" > "$h/cgroup.procs" 2>/dev/null || true; done < "$d/cgroup.procs"
      rmdir "$d" 2>/dev/null || echo "could not remove $d" >&2
    done
  done
  echo stopped
  ;;
*) echo "usage: $0 start|exec|stop STATE_DIR ..." >&2; exit 2;;
esac
