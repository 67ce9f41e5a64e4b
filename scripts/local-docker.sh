#!/usr/bin/env bash
# A private Docker engine for local builds and the deploy tests, on machines without a registry.
#
#   scripts/local-docker.sh tools     # apt-get install docker.io docker-compose debootstrap (if missing)
#   scripts/local-docker.sh start     # start our own dockerd on $ROOT/docker.sock (idempotent); prints DOCKER_HOST
#   scripts/local-docker.sh base      # build the local base image lamina-base:bookworm (debootstrap + docker import)
#   scripts/local-docker.sh wheels    # copy the torch/torchvision wheels (+ their deps) pip resolves here into deploy/wheels/
#   scripts/local-docker.sh stop      # stop the dockerd started by `start` (by its pid file)
#   scripts/local-docker.sh env       # print `export DOCKER_HOST=...` / `export DOCKER=...` for eval
#   scripts/local-docker.sh status    # exit 0 when the dockerd started by `start` is up
#
# Nothing is pulled from an image registry: the base image is a Debian bookworm rootfs made with
# `debootstrap --variant=minbase` (plus python3 + python3-venv, i.e. what python:3.11-slim provides) and imported
# with `docker import`; the Dockerfile takes it through `--build-arg BASE_IMAGE=lamina-base:bookworm`.
#
# Everything persists under $ROOT (default /var/cache/lamina-docker): the daemon's data root (so image layers are
# cached between runs), the rootfs tarball and the wheel cache. Delete the directory to start from scratch.
# Env: LAMINA_DOCKER_ROOT (=ROOT), LAMINA_DOCKER_EXEC_ROOT (default /run/lamina-docker), LAMINA_BASE_IMAGE.
# Runs as root (dockerd, debootstrap and apt need it).
set -euo pipefail

ROOT="${LAMINA_DOCKER_ROOT:-/var/cache/lamina-docker}"
EXEC_ROOT="${LAMINA_DOCKER_EXEC_ROOT:-/run/lamina-docker}"  # short: containerd's socket paths must stay < 108 chars
SOCK="$ROOT/docker.sock"
PIDFILE="$ROOT/dockerd.pid"
BASE_IMAGE="${LAMINA_BASE_IMAGE:-lamina-base:bookworm}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export DEBIAN_FRONTEND=noninteractive

log() { echo "[local-docker] $*" >&2; }
die() { log "error: $*"; exit 1; }

# Debian's docker.io client (20.10) has BuildKit built in; a newer static client elsewhere on PATH may lack buildx.
docker_bin() {
    if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || die "no docker client"; fi
}

cmd_tools() {
    local missing=()
    [ -x /usr/sbin/dockerd ] || [ -x /usr/bin/dockerd ] || missing+=(docker.io)
    [ -x /usr/bin/docker ] || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v iptables >/dev/null || missing+=(iptables)
    if [ "${#missing[@]}" -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]}"
        log "installing ${missing[*]} from Debian"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
    fi
}

running() {
    [ -S "$SOCK" ] && [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null \
        && DOCKER_HOST="unix://$SOCK" "$(docker_bin)" version >/dev/null 2>&1
}

cmd_start() {
    cmd_tools
    if running; then
        log "dockerd already running (pid $(cat "$PIDFILE"))"
    else
        mkdir -p "$ROOT/data" "$EXEC_ROOT"
        rm -f "$SOCK"
        log "starting dockerd (data root $ROOT/data, socket $SOCK)"
        # setsid: the daemon outlives this script and is not in the caller's process group
        # nice: builds and containers share the machine with other work
        setsid nice -n 10 dockerd --host "unix://$SOCK" --data-root "$ROOT/data" --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" --storage-driver overlay2 >"$ROOT/dockerd.log" 2>&1 </dev/null &
        local i
        for i in $(seq 1 120); do
            if DOCKER_HOST="unix://$SOCK" "$(docker_bin)" version >/dev/null 2>&1; then break; fi
            sleep 0.5
        done
        running || { tail -n 30 "$ROOT/dockerd.log" >&2; die "dockerd did not come up (log: $ROOT/dockerd.log)"; }
        log "dockerd up (pid $(cat "$PIDFILE"))"
    fi
    cmd_env
}

cmd_stop() {
    if [ -f "$PIDFILE" ]; then
        local pid
        pid="$(cat "$PIDFILE")"
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping dockerd (pid $pid)"
            kill -TERM "$pid"
            local i
            for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            if kill -0 "$pid" 2>/dev/null; then log "dockerd still running: SIGKILL"; kill -KILL "$pid"; fi
        fi
        rm -f "$PIDFILE"
    fi
    rm -f "$SOCK"
}

cmd_env() {
    echo "export DOCKER_HOST=unix://$SOCK"
    echo "export DOCKER=$(docker_bin)"
    echo "export DOCKER_BUILDKIT=1"
}

cmd_base() {
    running || die "dockerd is not running: run '$0 start' first"
    local docker
    docker="$(docker_bin)"
    if DOCKER_HOST="unix://$SOCK" "$docker" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return
    fi
    local tarball="$ROOT/rootfs-bookworm.tar"
    if [ ! -s "$tarball" ]; then
        local dir="$ROOT/rootfs.tmp"
        rm -rf "$dir"
        log "debootstrap bookworm (minbase + python3 python3-venv) into $dir"
        # the mirror is whatever this machine's apt uses
        local mirror
        mirror="$(sed -n 's/^URIs: *//p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) bookworm .*/\2/p' \
            /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)"
        [ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list*"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$mirror" \
            >"$ROOT/debootstrap.log" 2>&1 || { tail -n 20 "$ROOT/debootstrap.log" >&2; die "debootstrap failed"; }
        # the same apt sources as the host (security updates included), and no apt caches in the image
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            cp /etc/apt/sources.list.d/debian.sources "$dir/etc/apt/sources.list.d/"
            : >"$dir/etc/apt/sources.list"
        fi
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
        tar -C "$dir" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$dir"
    fi
    log "docker import $tarball as $BASE_IMAGE"
    DOCKER_HOST="unix://$SOCK" "$docker" import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

# The torch pins of pyproject.toml, with every dependency, as wheel files pip resolves on this machine (local wheel
# dirs from pip's config; the rest from the package index). The Dockerfile installs from deploy/wheels/ first.
cmd_wheels() {
    local cache="$ROOT/wheels" dest="$REPO/deploy/wheels"
    mkdir -p "$cache" "$dest"
    local pins
    pins="$("$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if re.match(r"(torch|torchvision)\b", d)))
EOF
)"
    [ -n "$pins" ] || die "no torch pins in pyproject.toml"
    local stamp="$cache/.pins"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$pins" ]; then
        log "pip download $pins (with dependencies) into $cache"
        rm -f "$cache"/*.whl
        # shellcheck disable=SC2086
        "$PYTHON" -m pip download --quiet --only-binary :all: -d "$cache" $pins  # host = image: cp311, x86_64, glibc 2.36
        echo "$pins" >"$stamp"
    fi
    # hard links when possible (same file system): no second copy of ~3 GB
    find "$dest" -maxdepth 1 -name '*.whl' -delete
    cp -l "$cache"/*.whl "$dest"/ 2>/dev/null || cp "$cache"/*.whl "$dest"/
    log "$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
}

case "${1:-}" in
    tools) cmd_tools ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) running ;;
    env) cmd_env ;;
    base) cmd_base ;;
    wheels) cmd_wheels ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
