#!/bin/sh
# Writes a tokens file for Secret tandem-auth: one inference and one admin token, random,
# readable by you alone. Git ignores the files the overlays read (overlays/gpu/tokens).
#   deploy/k8s/make-tokens.sh deploy/k8s/overlays/gpu/tokens
set -eu
out=${1:?usage: make-tokens.sh FILE}
umask 077
token() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
printf 'inference %s\nadmin %s\n' "$(token)" "$(token)" > "$out"
echo "wrote $out (inference and admin tokens)"
