#!/bin/sh
# dearmor-key.sh ARMORED KEYRING MODE: write the binary form of the armored key ARMORED to
# KEYRING when it differs. MODE "check" only reports. Prints unchanged, changed or would-change.
set -eu
armored=$1 keyring=$2 mode=$3
if [ ! -s "$armored" ]; then
  # Only in check mode: the key download was only pretended.
  echo would-change
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
GNUPGHOME=$work gpg --batch --quiet --dearmor --output "$work/keyring.gpg" "$armored"
if cmp -s "$work/keyring.gpg" "$keyring"; then
  echo unchanged
elif [ "$mode" = check ]; then
  echo would-change
else
  install -o root -g root -m 0644 "$work/keyring.gpg" "$keyring"
  echo changed
fi
