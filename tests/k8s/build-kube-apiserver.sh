#!/usr/bin/env bash
# build-kube-apiserver.sh: build (once) and cache a real kube-apiserver for npd's
# Kubernetes integration tests.
#
# Usage: tests/k8s/build-kube-apiserver.sh
#
# No registry reachable from the test machines ships a kube-apiserver binary, so this builds
# one from Debian 12's own `kubernetes` source package (upstream v1.20.2), following
# docs/testing.md:
#   1. installs, with apt-get and only when missing, the build and test tools (Go, make, rsync,
#      etcd, reflect2 1.0.2, openssl, curl, dpkg-dev, and kubectl from kubernetes-client
#      unless some kubectl is already on PATH);
#   2. fetches the source with `apt-get source kubernetes` through a PRIVATE apt configuration
#      that has deb-src enabled (the system's sources and package lists are left alone);
#   3. replaces the vendored modern-go/reflect2 1.0.1 (which crashes under Go >= 1.18 on the
#      first PATCH) with Debian's 1.0.2, and relaxes the events.k8s.io validation as
#      Kubernetes 1.21 did (Events about cluster-scoped objects allowed in `default`);
#   4. runs `make WHAT=cmd/kube-apiserver` (CGO_ENABLED=0, GOPATH mode: 4 minutes on 2 idle
#      cores, 9 on busy ones; 1.3 GB peak memory).
#
# The binary is cached at
#   ${NPD_CACHE:-$HOME/.cache/npd}/kube-apiserver-<Debian source version>/kube-apiserver
# next to a small `stamp` file. When it is already there, nothing is built and the script
# returns at once. The path of the binary is always the LAST line of stdout; all progress goes
# to stderr. Build scratch (source, GOPATH, GOCACHE, apt lists) lives in a temporary directory
# under the cache directory and is removed afterwards. Concurrent runs are serialised with
# flock. Needs root (or password-less sudo) only when packages must be installed.
set -euo pipefail

# Everything written to stdout by commands goes to stderr; only the final path goes to fd 3.
exec 3>&1 1>&2

log() { printf '[build-kube-apiserver] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

# Debian packages this script and tests/k8s/cluster.sh need. kubectl comes from
# kubernetes-client, installed only when no kubectl is on PATH: some images already carry
# another `kubectl` package (e.g. Google Cloud's) that owns /usr/bin/kubectl, and the two
# cannot be installed together.
PACKAGES=(
    golang-go make rsync etcd-server golang-github-modern-go-reflect2-dev openssl dpkg-dev curl
)
KUBECTL_PACKAGE=kubernetes-client
SOURCE_PACKAGE=kubernetes
# A binary package built from SOURCE_PACKAGE; its source version keys the cache.
VERSION_PROBE=kubernetes-client
REFLECT2_DEBIAN_DIR=/usr/share/gocode/src/github.com/modern-go/reflect2

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
else
    # sudo resets the environment: pass the frontend setting through.
    SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
fi
# Wait for a concurrent apt/dpkg run instead of failing at once.
APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=600)

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii"* ]]
}

install_missing_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if ! command -v kubectl >/dev/null && ! is_installed "$KUBECTL_PACKAGE"; then
        missing+=("$KUBECTL_PACKAGE")
    fi
    ((${#missing[@]} == 0)) && return 0
    log "installing missing packages: ${missing[*]}"
    if [[ ${#SUDO[@]} -gt 0 ]] && ! command -v sudo >/dev/null; then
        die "not root and no sudo: install these packages first: ${missing[*]}"
    fi
    "${SUDO[@]}" apt-get "${APT_LOCK_WAIT[@]}" update -q
    apt_updated=1
    "${SUDO[@]}" apt-get "${APT_LOCK_WAIT[@]}" install -y -q --no-install-recommends \
        "${missing[@]}" </dev/null
    for pkg in "${missing[@]}"; do
        is_installed "$pkg" || die "package $pkg is still not installed"
    done
}

# Prints the Debian source version of SOURCE_PACKAGE: that of the installed VERSION_PROBE
# (instant), else that of apt's candidate for it (parses the package lists: 1-2 s).
source_version() {
    if is_installed "$VERSION_PROBE"; then
        [[ $(dpkg-query -W -f='${source:Package}' "$VERSION_PROBE") == "$SOURCE_PACKAGE" ]] ||
            die "$VERSION_PROBE is not built from source package $SOURCE_PACKAGE"
        dpkg-query -W -f='${source:Version}' "$VERSION_PROBE"
        return
    fi
    apt-cache show --no-all-versions "$VERSION_PROBE" 2>/dev/null | awk -v src="$SOURCE_PACKAGE" '
        /^Version:/ { v = $2 }
        /^Source:/ { s = $2; if ($3 ~ /^\(/) { sv = $3; gsub(/[()]/, "", sv) } }
        END {
            if (s != "" && s != src) exit 1
            print (sv != "" ? sv : v)
        }'
}

# A fingerprint of apt's binary package lists: while it is unchanged, so is apt's candidate
# for VERSION_PROBE. Cached builds record it in their stamp, so that when VERSION_PROBE is not
# installed the cache is found without asking apt (which takes 1-2 s without pkgcache.bin).
lists_fingerprint() {
    local files=(/var/lib/apt/lists/*_Packages*)
    [[ -e ${files[0]} ]] || return 0
    stat -c '%n %s %Y' "${files[@]}" | md5sum | cut -d' ' -f1
}

# Prints the cached binary whose stamp records fingerprint $1.
cached_by_fingerprint() {
    local stamp
    [[ -n $1 ]] || return 1
    for stamp in "$cache_root"/kube-apiserver-*/stamp; do
        if [[ -f $stamp && -x ${stamp%/stamp}/kube-apiserver ]] &&
            grep -qx "apt_lists=$1" "$stamp"; then
            echo "${stamp%/stamp}/kube-apiserver"
            return 0
        fi
    done
    return 1
}

# Records fingerprint $2 in stamp $1 (one line, replacing the previous one).
record_fingerprint() {
    [[ -n $2 && -f $1 ]] || return 0
    grep -qx "apt_lists=$2" "$1" && return 0
    { grep -v '^apt_lists=' "$1" || true; echo "apt_lists=$2"; } >"$1.tmp"
    mv -f "$1.tmp" "$1"
}

home_dir=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
cache_root=$(realpath -m -- "${NPD_CACHE:-$home_dir/.cache/npd}")

apt_updated=0
install_missing_packages
fingerprint=''
if ! is_installed "$VERSION_PROBE"; then
    fingerprint=$(lists_fingerprint)
    if bin=$(cached_by_fingerprint "$fingerprint"); then
        log "cached: $bin"
        echo "$bin" >&3
        exit 0
    fi
fi
version=$(source_version || true)
if [[ -z $version && $apt_updated -eq 0 ]]; then
    log "no candidate for $VERSION_PROBE in the package lists; running apt-get update"
    "${SUDO[@]}" apt-get "${APT_LOCK_WAIT[@]}" update -q
    version=$(source_version || true)
fi
[[ -n $version ]] || die "cannot tell the version of Debian's $SOURCE_PACKAGE source package"
if ! is_installed "$VERSION_PROBE"; then
    fingerprint=$(lists_fingerprint)
fi

out_dir=$cache_root/kube-apiserver-$version
bin=$out_dir/kube-apiserver

if [[ -x $bin ]]; then
    if [[ -n $fingerprint ]]; then
        exec 9<"$out_dir"
        flock 9
        record_fingerprint "$out_dir/stamp" "$fingerprint"
    fi
    log "cached: $bin"
    echo "$bin" >&3
    exit 0
fi

mkdir -p "$out_dir"
# Serialise concurrent builds of the same version (the lock is on the directory itself, so
# the cache holds no lock file).
exec 9<"$out_dir"
if ! flock -n 9; then
    log "another build of $version is running; waiting for it"
    flock 9
fi
if [[ -x $bin ]]; then
    log "cached (built concurrently): $bin"
    echo "$bin" >&3
    exit 0
fi

# Remove scratch directories left behind by builds that were killed (SIGKILL, power loss).
for stale in "$cache_root"/kube-apiserver-build.*; do
    [[ -d $stale ]] || continue
    owner=${stale#"$cache_root"/kube-apiserver-build.}
    owner=${owner%%.*}
    if [[ $owner =~ ^[0-9]+$ ]] && ! kill -0 "$owner" 2>/dev/null; then
        log "removing stale scratch directory $stale"
        chmod -R u+w "$stale" 2>/dev/null || true
        rm -rf "$stale"
    fi
done

scratch=$(mktemp -d "$cache_root/kube-apiserver-build.$$.XXXXXX")
cleanup() {
    local rc=$?
    if [[ -n ${scratch:-} && -d $scratch ]]; then
        # Go writes read-only files; make them removable first.
        chmod -R u+w "$scratch" 2>/dev/null || true
        rm -rf "$scratch"
    fi
    rm -f "$out_dir/.kube-apiserver.tmp"
    [[ -x $bin ]] || rm -f "$out_dir/stamp" "$out_dir/stamp.tmp"
    # Leave no empty versioned directory behind a failed build.
    rmdir "$out_dir" 2>/dev/null || true
    if ((rc != 0)); then
        log "FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start=$SECONDS
log "building kube-apiserver from Debian source package $SOURCE_PACKAGE $version"
log "scratch directory: $scratch"

# --- 1. Fetch the source through a private apt configuration with deb-src enabled ---------
apt_dir=$scratch/apt
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
: >"$apt_dir/sources.list"
# One-line-style entries: keep only the `deb` lines, turned into `deb-src`.
deb_to_src() { sed -nE 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' "$1"; }
if [[ -f /etc/apt/sources.list ]]; then
    deb_to_src /etc/apt/sources.list >"$apt_dir/sources.list"
fi
for f in /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    deb_to_src "$f" >"$apt_dir/sources.list.d/$(basename "$f")"
done
# deb822-style entries: every stanza that has `deb` gets `Types: deb-src` only.
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    sed -E '/^Types:/I{/[[:space:]]deb([[:space:]]|$)/s/^.*$/Types: deb-src/}' "$f" \
        >"$apt_dir/sources.list.d/$(basename "$f")"
done
apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
)
if [[ $(id -u) -eq 0 ]]; then
    # The _apt sandbox user cannot write into a private directory under root's home.
    apt_opts+=(-o APT::Sandbox::User=root)
else
    apt_opts+=(-o Debug::NoLocking=true)
fi
log "apt-get update (private source lists)"
if ! apt-get "${apt_opts[@]}" update -q; then
    log "warning: apt-get update reported errors; trying to fetch the source anyway"
fi

src_root=$scratch/src
mkdir -p "$src_root"
log "apt-get source $SOURCE_PACKAGE=$version"
(cd "$src_root" && apt-get "${apt_opts[@]}" source -q "$SOURCE_PACKAGE=$version") ||
    die "apt-get source $SOURCE_PACKAGE=$version failed (is that version in the deb-src lists?)"
src_dir=$(find "$src_root" -mindepth 1 -maxdepth 1 -type d -name "$SOURCE_PACKAGE-*" -print -quit)
[[ -n $src_dir && -f $src_dir/Makefile ]] || die "no unpacked source tree in $src_root"
log "source tree: $src_dir"

# --- 2. Fixes ---------------------------------------------------------------------------
# 2a. reflect2 1.0.1 -> Debian's 1.0.2 (1.0.1 faults in map iteration under Go >= 1.18).
vendored=$src_dir/vendor/github.com/modern-go/reflect2
[[ -d $vendored ]] || die "missing $vendored"
[[ -d $REFLECT2_DEBIAN_DIR ]] || die "missing $REFLECT2_DEBIAN_DIR"
find "$vendored" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
n=0
for f in "$REFLECT2_DEBIAN_DIR"/*.go "$REFLECT2_DEBIAN_DIR"/*.s; do
    [[ -f $f ]] || continue
    [[ $f == *_test.go ]] && continue
    cp "$f" "$vendored/"
    n=$((n + 1))
done
((n > 0)) || die "no reflect2 sources copied from $REFLECT2_DEBIAN_DIR"
log "replaced vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' \
    golang-github-modern-go-reflect2-dev) ($n files)"

# 2b. Kubernetes 1.21's relaxation: a "new" (events.k8s.io) Event about a cluster-scoped
#     object may live in `default` as well as `kube-system`.
events_go=$src_dir/pkg/apis/core/validation/events.go
old='len(event.InvolvedObject.Namespace) == 0 && event.Namespace != metav1.NamespaceSystem {'
new='len(event.InvolvedObject.Namespace) == 0 \&\& event.Namespace != metav1.NamespaceDefault \&\& event.Namespace != metav1.NamespaceSystem {'
if grep -qF "$old" "$events_go"; then
    sed -i "s/$(printf '%s' "$old" | sed 's/[][\.*^$/&]/\\&/g')/$new/" "$events_go"
    grep -qF 'event.Namespace != metav1.NamespaceDefault && event.Namespace != metav1.NamespaceSystem' \
        "$events_go" || die "events validation patch did not apply"
    log "relaxed events.k8s.io validation (default namespace allowed for cluster-scoped objects)"
else
    log "warning: events validation line not found in $events_go; left unchanged"
fi

# --- 3. Build ---------------------------------------------------------------------------
upstream=${version#*:}   # epoch
upstream=${upstream%-*}  # Debian revision
upstream=${upstream##*really}
[[ $upstream =~ ^([0-9]+)\.([0-9]+)\.[0-9]+ ]] || die "cannot parse upstream version from $version"
version_file=$scratch/kube-version
cat >"$version_file" <<EOF
KUBE_GIT_VERSION='v$upstream'
KUBE_GIT_MAJOR='${BASH_REMATCH[1]}'
KUBE_GIT_MINOR='${BASH_REMATCH[2]}'
KUBE_GIT_COMMIT='debian-$SOURCE_PACKAGE-$version'
KUBE_GIT_TREE_STATE='clean'
EOF
mkdir -p "$scratch/gopath" "$scratch/gocache" "$scratch/home" "$scratch/tmp"
go_bin=/usr/lib/go/bin
[[ -x $go_bin/go ]] || go_bin=$(dirname "$(command -v go)")
log "go: $("$go_bin/go" version)"
log "make WHAT=cmd/kube-apiserver (several minutes)"
(
    cd "$src_dir"
    env -u GOFLAGS -u GOROOT -u GOBIN \
        PATH="$go_bin:$PATH" \
        HOME="$scratch/home" \
        TMPDIR="$scratch/tmp" \
        GOPATH="$scratch/gopath" \
        GOCACHE="$scratch/gocache" \
        GOENV=off \
        GO111MODULE=off \
        GOTOOLCHAIN=local \
        CGO_ENABLED=0 \
        KUBE_GIT_VERSION_FILE="$version_file" \
        make WHAT=cmd/kube-apiserver
) || die "make WHAT=cmd/kube-apiserver failed"

built=$(find "$src_dir/_output" -type f -name kube-apiserver -path '*/bin/*' -print -quit)
[[ -n $built && -x $built ]] || die "build finished but no kube-apiserver binary in _output"
reported=$("$built" --version 2>&1) || die "built binary does not run: $reported"
log "built: $reported"

# --- 4. Cache ---------------------------------------------------------------------------
cat >"$out_dir/stamp" <<EOF
source_package=$SOURCE_PACKAGE
source_version=$version
binary_version=$reported
reflect2=$(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)
go=$("$go_bin/go" version)
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((SECONDS - start))
sha256=$(sha256sum "$built" | cut -d' ' -f1)
EOF
record_fingerprint "$out_dir/stamp" "$fingerprint"
install -m 0755 "$built" "$out_dir/.kube-apiserver.tmp"
mv -f "$out_dir/.kube-apiserver.tmp" "$bin"
log "cached $bin after $((SECONDS - start)) s"
echo "$bin" >&3
