#!/usr/bin/env bash
# Builds kms's development SM token: SoftHSM2 from Debian's source package with softhsm2-sm.patch (SM4, SM2, SM3 under
# the vendor codes of the softhsm2-sm-dev mechanism profile), and installs it into
#   ${KMS_SM_TOKEN_CACHE:-/var/cache/kms/softhsm2-sm}/<first 16 hex digits of sha256(softhsm2-sm.patch || build.sh)>/
# Prints that prefix (the module is <prefix>/lib/softhsm/libsofthsm2.so, the tool <prefix>/bin/softhsm2-util).
# A prefix holding a finished build (its stamp file is written last) is reused: a rebuild only when the patch or this
# script changes. kms/dev/smtoken.py computes the same prefix.
#
#   build.sh                  build if needed, print the prefix
#   build.sh --print-prefix   print the prefix only (no build)
#
# Needs apt (a deb-src entry is added if there is none) and root to install the build dependencies that are missing.
# See README.md next to this script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
patch_file="$here/softhsm2-sm.patch"
cache="${KMS_SM_TOKEN_CACHE:-/var/cache/kms/softhsm2-sm}"
key="$(cat "$patch_file" "$here/build.sh" | sha256sum | cut -c1-16)"
prefix="$cache/$key"
stamp="$prefix/.kms-sm-token-built"

case "${1:-}" in
  --print-prefix) echo "$prefix"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--print-prefix]" >&2; exit 2 ;;
esac
[[ -f "$stamp" ]] && { echo "$prefix"; exit 0; }

say() { echo "softhsm2-sm: $*" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$cache"
exec 9>"$cache/.lock-$key"
flock 9                                   # one build per prefix at a time; a second caller waits and reuses it
[[ -f "$stamp" ]] && { echo "$prefix"; exit 0; }

# Build dependencies (what Debian's softhsm2 build needs for this configuration; no autotools: the patch adds headers
# only, so the shipped configure and Makefile.in stay valid).
deps=(dpkg-dev g++ make pkg-config libssl-dev)
missing=()
for p in "${deps[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || die "missing build dependencies (${missing[*]}); install them as root"
  say "installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi

# A deb-src entry mirroring the deb entries, if there is none.
if ! grep -qsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources; then
  [[ $EUID -eq 0 ]] || die "apt has no deb-src entry; add one (as root) or run this script as root"
  say "adding a deb-src entry"
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then   # deb822: the Debian stanzas, as deb-src
    awk -v RS= -v ORS='\n\n' '/URIs:[^\n]*(debian|ubuntu)/' /etc/apt/sources.list.d/*.sources \
      | sed -E 's/^Types:.*/Types: deb-src/' > /etc/apt/sources.list.d/kms-deb-src.sources
    list=/etc/apt/sources.list.d/kms-deb-src.sources
  else
    sed -nE '/(debian|ubuntu)/s/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list \
      > /etc/apt/sources.list.d/kms-deb-src.list
    list=/etc/apt/sources.list.d/kms-deb-src.list
  fi
  [[ -s "$list" ]] || { rm -f "$list"; die "no Debian apt source to mirror as deb-src"; }
  apt-get update -q >&2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/softhsm2-sm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"

# The source: Debian's package with its patches applied (dpkg-source), and the SM patch on top. Some mirrors serve the
# upstream tarball but not Debian's packaging tarball, and the SM patch is written against the upstream tarball of the
# same version (Debian's patches touch none of the code it changes, but a fuzzy context is not worth a failed build):
# when the Debian tree cannot be had or the patch does not apply to it cleanly, the upstream tarball is built, and
# this is said.
apt_src=(apt-get -q -o APT::Sandbox::User=root source)
src=""
if "${apt_src[@]}" softhsm2 >&2; then
  src="$(find . -mindepth 1 -maxdepth 1 -type d -name 'softhsm2-*' | head -n1)"
  version="$(sed -n '1s/^softhsm2 (\([^)]*\)).*/\1/p' "$src/debian/changelog") (debian/patches applied)"
  if ! patch -p1 --dry-run --batch --fuzz=0 -d "$src" < "$patch_file" >/dev/null 2>&1; then
    say "warning: softhsm2-sm.patch does not apply cleanly to Debian's tree of softhsm2 $version"
    src=""
  fi
else
  say "warning: Debian's packaging tarball could not be fetched"
fi
if [[ -z "$src" ]]; then
  say "building the upstream tarball of Debian's source package instead (Debian's patches not applied)"
  rm -rf ./*
  "${apt_src[@]}" --tar-only softhsm2 >&2 || die "apt-get source --tar-only softhsm2 failed"
  tar xzf softhsm2_*.orig.tar.gz
  src="$(find . -mindepth 1 -maxdepth 1 -type d -name 'softhsm2-*' | head -n1)"
  version="$(ls softhsm2_*.orig.tar.gz | sed 's/^softhsm2_\(.*\)\.orig\.tar\.gz$/\1/') (upstream tarball)"
fi
say "source: softhsm2 $version"
cd "$src"
patch -p1 --forward --batch < "$patch_file" >&2 || die "softhsm2-sm.patch does not apply to softhsm2 $version"

# Only what kms needs: the OpenSSL backend with ECC, no GOST, no p11-kit registration, no SQLite object store, no
# migration tool, no static libraries (libtool would compile everything twice), no debug info; only the module
# (src/lib) and softhsm2-util (src/bin/util) are built, and the unit tests are not.
rm -rf "$prefix"
./configure -q --prefix="$prefix" \
  --with-crypto-backend=openssl --enable-ecc --enable-eddsa --disable-gost \
  --disable-p11-kit --without-objectstore-backend-db --without-migrate --disable-static \
  CXXFLAGS="-O2 -g0" >&2
jobs="${KMS_SM_TOKEN_JOBS:-2}"
make -s -j"$jobs" -C src/lib >&2
make -s -j"$jobs" -C src/bin/util >&2
make -s -C src/lib install >&2
make -s -C src/bin/util install >&2
[[ -f "$prefix/lib/softhsm/libsofthsm2.so" && -x "$prefix/bin/softhsm2-util" ]] || die "the build installed no module"
printf 'softhsm2 %s\npatch sha256 %s\n' "$version" "$(sha256sum < "$patch_file" | cut -d' ' -f1)" > "$stamp"
say "installed into $prefix"
echo "$prefix"
