#!/usr/bin/env bash
# The README's two first commands, verbatim, on a bare Debian bookworm root (debootstrap minbase + python3,
# python3-venv, python3-pip, git, ca-certificates): no bubblewrap, no docker, no C++ compiler, no ../shared.
#
#   sudo bash .ci/fresh-root.sh            # run both lines (long: line 1 trains ~14 min, line 2 is the suite)
#   sudo bash .ci/fresh-root.sh --check    # set up, run cheap checks inside, tear down (seconds)
#
# Each run starts from a pristine root: /var/tmp/fresh-root (made by debootstrap on first use) is the read-only
# lower layer of an overlay mounted at /var/tmp/fresh-run/root; what a run writes (the clone, the venv, pip's and
# agentrl's caches, /tmp) lands in /var/tmp/fresh-run/upper and is kept for inspection until the next run.
# The overlay also makes the root a mount point, so commands enter it by pivot_root in a mount namespace of
# their own (a plain chroot would refuse the local sandbox's user namespace; see root_command).
#
# Packages come from this machine's pip configuration: /etc/xdg/pip, /etc/pip.conf and /root/.config/pip are
# bind-mounted read-only (the last holds find-links /opt/wheels and the /opt/pypi* indexes), with /opt/wheels,
# /opt/pypi, /opt/pypi-more, /etc/ssl/certs and /etc/resolv.conf; PIP_* variables of this shell pass through.
#
# Logs: $LOGS/fresh-line1.log, $LOGS/fresh-line2.log ($LOGS: the current directory) (the line, start/end stamps, its output, exit
# code, then /usr/bin/time -v's report: wall time and peak memory).
set -euo pipefail

MAIN=${MAIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}   # the repository this script sits in
LOWER=${LOWER:-/var/tmp/fresh-root}
RUN=${RUN:-/var/tmp/fresh-run}
MIRROR=${MIRROR:-}
LOGS=${LOGS:-$PWD}
ROOT=$RUN/root
CLONE=/home/user/agentrl
MODE=${1:-run}

[ "$(id -u)" = 0 ] || { echo "run as root (chroot, mount)" >&2; exit 1; }

mirror() {  # the Debian mirror apt uses here (deb822 URIs: or one-line deb), else the CDN
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
    [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

make_lower() {
    [ -x "$LOWER/usr/bin/python3" ] && return
    echo "debootstrap bookworm into $LOWER from ${MIRROR:-$(mirror)}"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,git,ca-certificates \
        bookworm "$LOWER" "${MIRROR:-$(mirror)}"
}

# What a fresh Debian install has and debootstrap leaves out: /etc/hosts (localhost), a home for the user.
furnish() {
    [ -e "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$ROOT/etc/hosts"
    mkdir -p "$ROOT/home/user"
}

ro_bind() {  # ro_bind SRC: SRC at the same path inside the root, read-only (skipped when SRC is missing)
    local src=$1 dst=$ROOT$1
    [ -e "$src" ] || return 0
    if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; [ -e "$dst" ] || : >"$dst"; fi
    mount --bind "$src" "$dst"
    mount -o remount,bind,ro "$dst"
}

setup() {
    teardown quiet
    if grep -q " $RUN" /proc/mounts; then  # never delete through a live bind of /dev or /sys
        echo "still mounted under $RUN; unmount by hand:" >&2
        grep " $RUN" /proc/mounts >&2
        exit 1
    fi
    rm -rf --one-file-system "$RUN"
    mkdir -p "$RUN/upper" "$RUN/work" "$ROOT"
    mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$RUN/upper,workdir=$RUN/work" "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /sys "$ROOT/sys" && mount --make-rslave "$ROOT/sys"
    mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev"
    for path in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip /etc/pip.conf /root/.config/pip \
        /etc/ssl/certs /etc/resolv.conf; do
        ro_bind "$path"
    done
    furnish
}

teardown() {
    if mountpoint -q "$ROOT"; then
        umount -R "$ROOT" || umount -R -l "$ROOT"
    elif [ "${1:-}" != quiet ]; then
        echo "nothing mounted at $ROOT"
    fi
}

# The fenced ```bash block right under the README's first lines, each line without its trailing # comment.
readme_lines() {
    awk '/^```bash[[:space:]]*$/ && !seen {inside=1; seen=1; next} inside && /^```/ {exit} inside' "$1" \
        | sed -E 's/[[:space:]]+#[^#]*$//' | sed -E 's/[[:space:]]+$//' | grep -v '^$'
}

# Inside the root as root (as on this machine), from the clone's root with the venv active; a clean login-like
# environment plus this shell's PIP_* settings. Not a bare chroot: the kernel refuses user namespaces to a
# chrooted process, and the local sandbox's bubblewrap needs one. A private mount namespace pivots to the root
# instead and lets go of the host's tree, as a container would; the mounts made in setup come along.
ENTER='cd "$0" && mkdir -p .old-root && pivot_root . .old-root && cd / && umount -l /.old-root && rmdir /.old-root && exec "$@"'
root_command() {  # root_command LINE: the argv that runs LINE there (in the array CMD)
    CMD=(unshare --mount --propagation private --fork -- /bin/sh -c "$ENTER" "$ROOT"
        /usr/bin/env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8 TERM=dumb
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
    while IFS= read -r setting; do CMD+=("$setting"); done < <(env | grep '^PIP_' || true)
    CMD+=(/bin/bash -c "cd $CLONE && . .venv/bin/activate && $1")
}

in_root() {
    root_command "$1"
    "${CMD[@]}"
}

run_line() {  # run_line N LINE
    local log=$LOGS/fresh-line$1.log rc=0
    printf 'line %s: %s\nstart: %s\n' "$1" "$2" "$(date -u +%FT%TZ)" >"$log"
    root_command "$2"
    /usr/bin/time -v -o "$log.time" "${CMD[@]}" >>"$log" 2>&1 || rc=$?
    printf 'end: %s\nexit code: %s\n' "$(date -u +%FT%TZ)" "$rc" >>"$log"
    cat "$log.time" >>"$log" && rm -f "$log.time"
    echo "line $1 exit $rc, $(grep -m1 'Elapsed (wall clock)' "$log" | sed 's/.*: //') wall: $log"
}

main() {
    make_lower
    trap 'teardown quiet' EXIT
    setup
    git clone --quiet --no-hardlinks "$MAIN" "$ROOT$CLONE"
    echo "cloned $MAIN at $(git -C "$ROOT$CLONE" log -1 --format='%h %cI %s' | cut -c1-100)"
    chroot "$ROOT" python3 -m venv "$CLONE/.venv"  # (a chroot is enough for this)
    mapfile -t lines < <(readme_lines "$ROOT$CLONE/README.md")
    if [ "${#lines[@]}" -ne 2 ]; then
        printf 'expected the README block to hold 2 lines, found %s:\n' "${#lines[@]}" >&2
        printf '  %s\n' "${lines[@]}" >&2
        exit 1
    fi
    printf 'README line %s: %s\n' 1 "${lines[0]}" 2 "${lines[1]}"
    if [ "$MODE" = --check ]; then
        in_root 'python --version; python -c "import ssl, sys; print(sys.prefix, ssl.OPENSSL_VERSION)"
            grep -c . /proc/self/mountinfo; test -e /.old-root && echo LEAK || echo "no host tree"
            for tool in bwrap docker g++ gcc; do command -v $tool || echo "no $tool"; done
            pip --version; pip config list
            pip download --no-deps --quiet torch==2.13.0 -d /tmp/x && ls /tmp/x
            pip install --dry-run torch==2.13.0 2>&1 | grep -v "^WARNING: Location" | tail -1
            getent hosts localhost; test -e ../shared && echo "../shared exists" || echo "no ../shared"'
        return
    fi
    mkdir -p "$LOGS"
    run_line 1 "${lines[0]}"
    run_line 2 "${lines[1]}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main; fi
