#!/usr/bin/env bash
# The Debian mirror this machine already uses, read from its apt sources, so nothing of
# ours names a mirror host.
#
#   ci/debian-mirror.sh            # prints the mirror URI (e.g. for debootstrap)
#   ci/debian-mirror.sh --keyring  # prints "URI<TAB>KEYRING" (KEYRING from Signed-By, may be empty)
#
# The mirror is the URI of the first enabled `deb` entry that carries the machine's own
# release suite (VERSION_CODENAME of /etc/os-release: "bookworm", not bookworm-security or
# bookworm-updates), in /etc/apt/sources.list, /etc/apt/sources.list.d/*.list (one-line
# format) and /etc/apt/sources.list.d/*.sources (deb822). DEBIAN_MIRROR, when set, wins.
# Fails, saying so, when there is no such entry.
set -euo pipefail

die() { echo "debian-mirror: error: $*" >&2; exit 1; }

if [ -n "${DEBIAN_MIRROR:-}" ]; then
  if [ "${1:-}" = --keyring ]; then printf '%s\t\n' "$DEBIAN_MIRROR"; else echo "$DEBIAN_MIRROR"; fi
  exit 0
fi

# shellcheck disable=SC1091
. /etc/os-release
CODENAME="${VERSION_CODENAME:-}"
[ -n "$CODENAME" ] || die "no VERSION_CODENAME in /etc/os-release; set DEBIAN_MIRROR=<Debian mirror URI>"

# Prints "URI<TAB>KEYRING" for each entry that carries the bare <codename> suite.
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    awk -v s="$CODENAME" '
      $1 == "deb" {
        i = 2; opts = "";
        if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
        if ($(i + 1) == s) {
          key = "";
          if (match(opts, /signed-by=[^] ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10);
          print $i "\t" key; exit
        }
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822 stanzas separated by blank lines.
    awk -v s="$CODENAME" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " s " ") && enabled != "no" && uri != "") { print uri "\t" key; found = 1; exit }
        types = ""; suites = ""; uri = ""; key = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "types:"     { types = $0; sub(/^[^:]*:[ \t]*/, "", types) }
      tolower($1) == "uris:"      { uri = $2 }
      tolower($1) == "suites:"    { suites = $0; sub(/^[^:]*:[ \t]*/, "", suites) }
      tolower($1) == "signed-by:" { key = $2 }
      tolower($1) == "enabled:"   { enabled = tolower($2) }
      END { if (!found) flush() }' "$f"
  done
}

line="$(find_mirror | head -n1)"
[ -n "$line" ] || die "no apt source for suite $CODENAME in /etc/apt/sources.list or /etc/apt/sources.list.d/ (*.list, *.sources); set DEBIAN_MIRROR=<Debian mirror URI>"
if [ "${1:-}" = --keyring ]; then echo "$line"; else echo "${line%%$'\t'*}"; fi
