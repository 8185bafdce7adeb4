#!/usr/bin/env bash
# Build a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and kwok (fake nodes and pods) from Go modules, the way envtest's
# binaries are built upstream, into a per-version cache outside the repository.
#
# Only the Go module proxy is reachable from our build machines (no release tarballs),
# so the binaries are compiled from the pinned module versions below. The result is
# cached by version; when every requested binary is already there this is a no-op.
#
# Kueue (sigs.k8s.io/kueue: quotas and admission for batch Jobs) is built the same way, in
# its own scratch module at its own go.mod's dependency versions (k8s.io client libraries
# v0.35, one minor behind the server, which talks to them fine).
#
# Usage: tests/cluster/build.sh [COMPONENT...]
#   COMPONENT: etcd kube-apiserver kube-controller-manager kube-scheduler kwok kueue
#   (default: etcd kube-apiserver)
# Environment:
#   KUBETUNE_K8S_VERSION   Kubernetes release, default v1.36.3
#   KUBETUNE_ETCD_VERSION  etcd release, default v3.6.17 (the 3.6 line Kubernetes 1.34-1.36 use)
#   KUBETUNE_KWOK_VERSION  kwok release, default v0.8.0 (built against k8s.io/client-go v0.36)
#   KUBETUNE_KUEUE_VERSION Kueue release, default v0.17.0 (client-go v0.35.3)
#   KUBETUNE_CACHE_DIR     cache root, default ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune
#   KUBETUNE_GOSUMDB       checksum database, default off (sum.golang.org is unreachable here)
# The last line printed is the bin directory.
set -euo pipefail

K8S_VERSION="${KUBETUNE_K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${KUBETUNE_ETCD_VERSION:-v3.6.17}"
KWOK_VERSION="${KUBETUNE_KWOK_VERSION:-v0.8.0}"
KUEUE_VERSION="${KUBETUNE_KUEUE_VERSION:-v0.17.0}"
CACHE_ROOT="${KUBETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
BIN="$CACHE_ROOT/k8s-$K8S_VERSION/bin"

# Static, reproducible-ish binaries like upstream's hack/lib/golang.sh; the local
# toolchain only (no toolchain downloads); -mod=mod because the scratch module's
# go.sum is written as we go.
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false"
export GOSUMDB="${KUBETUNE_GOSUMDB:-off}"

log() { echo "build.sh: $*" >&2; }

# Run a go module command with its chatter ("go: added ...") shown only when it fails.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
}

# The version a binary was built at is kept next to it, so changing a pin rebuilds it.
wanted_version() {
  case "$1" in
    etcd) echo "$ETCD_VERSION" ;;
    kwok) echo "$KWOK_VERSION" ;;
    kueue) echo "$KUEUE_VERSION" ;;
    *) echo "$K8S_VERSION" ;;
  esac
}

is_built() {
  [[ -x "$BIN/$1" && "$(cat "$BIN/.$1.version" 2>/dev/null)" == "$(wanted_version "$1")" ]]
}

# Move a freshly linked binary into the cache atomically, with its version stamp.
install_bin() {
  local name="$1" built="$2"
  mv -f "$built" "$BIN/$name"
  wanted_version "$name" >"$BIN/.$name.version"
  log "built $name $(wanted_version "$name")"
}

# kubernetes' go.mod requires every staging module at v0.0.0 and replaces it with
# ./staging/src/k8s.io/X, so `go install k8s.io/kubernetes/cmd/...@v1.x` is refused.
# A scratch main module replaces each staging module with its published v0.<minor>.<patch>.
prepare_k8s_module() {
  local dir="$1" gomod staging_version="v0.${K8S_VERSION#v1.}" m
  (cd "$dir" && quiet go mod init kubetune.local/k8sbin)
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -nE 's/^[[:space:]]*"GoMod": "(.*)",?$/\1/p')
  [[ -f "$gomod" ]] || { log "cannot download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
  # The release's godebug defaults change runtime behaviour; keep them.
  grep -E '^godebug ' "$gomod" | sort -u >>"$dir/go.mod" || true
  for m in $(sed -nE 's#^[[:space:]]*(k8s\.io/[^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\1#p' "$gomod"); do
    # A few staging modules (sample-*) are not published for every patch; the
    # binaries do not import them, so leaving them unreplaced is harmless.
    if (cd "$dir" && go list -m "$m@$staging_version" >/dev/null 2>&1); then
      (cd "$dir" && go mod edit -replace="$m=$m@$staging_version")
    else
      log "note: $m@$staging_version not on the proxy; not replaced"
    fi
  done
  (cd "$dir" && quiet nice -n 19 go get "k8s.io/kubernetes@$K8S_VERSION")
}

# Stamp the version as hack/lib/version.sh does; without it /version reports
# v0.0.0-master and clients that parse the server version (Kueue) fail.
k8s_ldflags() {
  local minor kv ld="-s -w"
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  for kv in "gitVersion=$K8S_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean \
    "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
    ld+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  echo "$ld"
}

build_k8s() {
  local work="$1"; shift
  local dir="$work/k8s" name
  mkdir -p "$dir" "$work/out"
  prepare_k8s_module "$dir"
  for name in "$@"; do
    log "compiling $name $K8S_VERSION (cold: many minutes)"
    (cd "$dir" && nice -n 19 go build -trimpath -tags selinux,notest -ldflags "$(k8s_ldflags)" \
      -o "$work/out/$name" "k8s.io/kubernetes/cmd/$name")
    install_bin "$name" "$work/out/$name"
  done
}

# etcd's main package is the server module's root; its go.mod has replace lines too,
# so it is built from a scratch module as well.
build_etcd() {
  local work="$1" dir="$1/etcd"
  mkdir -p "$dir" "$work/out"
  (cd "$dir" && quiet go mod init kubetune.local/etcdbin &&
    quiet nice -n 19 go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  log "compiling etcd $ETCD_VERSION"
  (cd "$dir" && nice -n 19 go build -trimpath \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
    -o "$work/out/etcd" go.etcd.io/etcd/server/v3)
  install_bin etcd "$work/out/etcd"
}

# kwok's go.mod has no replace lines, but a scratch module keeps its dependency versions
# out of everyone else's and lets us stamp the version like hack/releases.sh does.
build_kwok() {
  local work="$1" dir="$1/kwok"
  mkdir -p "$dir" "$work/out"
  (cd "$dir" && quiet go mod init kubetune.local/kwokbin &&
    quiet nice -n 19 go get "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
  log "compiling kwok $KWOK_VERSION (cold: a few minutes)"
  (cd "$dir" && nice -n 19 go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
    -o "$work/out/kwok" sigs.k8s.io/kwok/cmd/kwok)
  install_bin kwok "$work/out/kwok"
}

# A sigs.k8s.io controller (Kueue): a scratch module that requires the release (no replace
# lines in its go.mod, so its dependency versions are taken as they are), the version
# stamped as its Makefile does. The CRDs and webhook manifests the tests apply are read
# from the module cache (tests/cluster/kueue.py: `go mod download -json MODULE@VERSION`).
build_sigs() {
  local work="$1" name="$2" module="$3" pkg="$4" ldflags="$5" dir="$1/$2"
  mkdir -p "$dir" "$work/out"
  (cd "$dir" && quiet go mod init "kubetune.local/${name}bin" &&
    quiet nice -n 19 go get "$module@$(wanted_version "$name")")
  log "compiling $name $(wanted_version "$name") (cold: several minutes)"
  (cd "$dir" && nice -n 19 go build -trimpath -ldflags "-s -w $ldflags" -o "$work/out/$name" "$pkg")
  install_bin "$name" "$work/out/$name"
}

main() {
  local components=("$@") missing_k8s=() c
  [[ ${#components[@]} -gt 0 ]] || components=(etcd kube-apiserver)
  for c in "${components[@]}"; do
    case "$c" in
      etcd | kube-apiserver | kube-controller-manager | kube-scheduler | kwok | kueue) ;;
      *) log "unknown component: $c"; exit 2 ;;
    esac
  done
  mkdir -p "$BIN"
  # Several test sessions may start at once; one builds, the others wait and reuse.
  exec 9>"$BIN/../.build.lock"
  flock 9
  WORK=$(mktemp -d "$BIN/../.work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  for c in "${components[@]}"; do
    is_built "$c" && continue
    case "$c" in
      etcd) build_etcd "$WORK" ;;
      kwok) build_kwok "$WORK" ;;
      kueue) build_sigs "$WORK" kueue sigs.k8s.io/kueue sigs.k8s.io/kueue/cmd/kueue \
        "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" ;;
      *) missing_k8s+=("$c") ;;
    esac
  done
  [[ ${#missing_k8s[@]} -eq 0 ]] || build_k8s "$WORK" "${missing_k8s[@]}"
  echo "$BIN"
}

main "$@"
