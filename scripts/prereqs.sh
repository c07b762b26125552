#!/usr/bin/env bash
# Installs what the pipeline needs to run and test locally, when missing:
#   - Azurite (pinned) via npm into .tools/ (git-ignored);
#   - Mosquitto via apt;
#   - with --test, what only the tests use: docker-compose via apt (to validate
#     docker-compose.yml), pyarrow + DuckDB in a Python venv under .tools/py (to check that
#     analysts' tools read the Parquet archives), and Debian's Chromium via apt with
#     playwright-core (pinned) via npm into .tools/browser (the dashboard's browser test),
#     promtool alone, extracted from Debian's prometheus package into .tools/prometheus
#     (the alerting rules' tests; no Prometheus server or service is installed), and kubectl
#     alone, extracted from Debian's kubernetes-client into .tools/kubectl, with
#     kubernetes-validate (pinned) in .tools/py (the Kubernetes manifests' offline checks).
# Sourced or run; prints what it does, and nothing when everything is present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AZURITE_VERSION="3.37.0"
AZURITE_BIN="$ROOT/.tools/node_modules/.bin/azurite"
PYARROW_VERSION="18.1.0"
PLAYWRIGHT_VERSION="1.64.1"
DUCKDB_VERSION="1.1.3"
KUBERNETES_VALIDATE_VERSION="1.37.0"

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "error: need root or sudo to apt-get install $*" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "==> Installing $* with apt"
  $sudo apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found. Install Rust from https://rustup.rs and run this again." >&2
  exit 1
fi

if ! command -v npm >/dev/null; then
  apt_install nodejs npm
fi

installed="$(node -p "require('$ROOT/.tools/node_modules/azurite/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$AZURITE_VERSION" ]; then
  echo "==> Installing Azurite $AZURITE_VERSION into .tools/ (about 30 s)"
  mkdir -p "$ROOT/.tools"
  npm install --prefix "$ROOT/.tools" --no-save --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi

if [ "${1:-}" = "--test" ]; then
  # One binary out of a Debian package, into .tools/<dir>, installing nothing system-wide.
  extract_from_deb() {
    local package="$1" path="$2" dir="$3" deb_dir
    echo "==> Extracting $path from Debian's $package package into .tools/$dir"
    deb_dir="$(mktemp -d)"
    trap 'rm -rf "$deb_dir"' EXIT
    if ! (cd "$deb_dir" && apt-get download "$package" >/dev/null 2>&1); then
      # No package lists yet: update them, then download again.
      local sudo=""
      if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "error: need root or sudo to apt-get update" >&2; exit 1; }
        sudo="sudo"
      fi
      $sudo apt-get update -qq >/dev/null
      (cd "$deb_dir" && apt-get download "$package" >/dev/null)
    fi
    mkdir -p "$deb_dir/x" "$ROOT/.tools/$dir$(dirname "$path")"
    dpkg-deb --fsys-tarfile "$deb_dir"/"$package"_*.deb | tar -x -C "$deb_dir/x" ".$path"
    mv "$deb_dir/x$path" "$ROOT/.tools/$dir$path"
    rm -rf "$deb_dir"
    trap - EXIT
  }
  if ! command -v promtool >/dev/null && [ ! -x "$ROOT/.tools/prometheus/usr/bin/promtool" ]; then
    extract_from_deb prometheus /usr/bin/promtool prometheus
  fi
  # Debian's kubectl (1.20, kustomize v2) even where a newer one is installed: the tests
  # render the manifests with both, so they stay valid for old and new kustomize alike.
  if [ ! -x "$ROOT/.tools/kubectl/usr/bin/kubectl" ]; then
    extract_from_deb kubernetes-client /usr/bin/kubectl kubectl
  fi
  if ! command -v docker-compose >/dev/null; then
    apt_install docker-compose
  fi
  PY="$ROOT/.tools/py/bin/python"
  if ! "$PY" -c "import pyarrow, duckdb, importlib.metadata as m; assert pyarrow.__version__ == '$PYARROW_VERSION' and duckdb.__version__ == '$DUCKDB_VERSION' and m.version('kubernetes-validate') == '$KUBERNETES_VALIDATE_VERSION'" 2>/dev/null; then
    echo "==> Installing pyarrow $PYARROW_VERSION, DuckDB $DUCKDB_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION into .tools/py (about 30 s)"
    if ! python3 -m venv "$ROOT/.tools/py" >/dev/null 2>&1; then
      apt_install python3-venv
      python3 -m venv "$ROOT/.tools/py"
    fi
    "$PY" -m pip install -q --disable-pip-version-check "pyarrow==$PYARROW_VERSION" "duckdb==$DUCKDB_VERSION" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
  fi
  installed="$(node -p "require('$ROOT/.tools/browser/node_modules/playwright-core/package.json').version" 2>/dev/null || true)"
  if [ "$installed" != "$PLAYWRIGHT_VERSION" ]; then
    echo "==> Installing playwright-core $PLAYWRIGHT_VERSION into .tools/browser (it drives Debian's Chromium; it downloads no browser)"
    mkdir -p "$ROOT/.tools/browser"
    npm install --prefix "$ROOT/.tools/browser" --no-save --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
  fi
fi
