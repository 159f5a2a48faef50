#!/bin/sh
# One-shot `models` service: build the built-in demo models into $MODELS_DIR (a named volume)
# unless this builder version is already there, then exit 0. DEMO_MODELS=0 skips it (own models).
set -eu
out=${MODELS_DIR:-/models}
if [ "${DEMO_MODELS:-1}" = 0 ]; then
    echo "DEMO_MODELS=0: not building the demo models"
    exit 0
fi
key=$(python -c "from common.demo_models import builder_key; print(builder_key())")
if [ "$(cat "$out/BUILD_KEY" 2>/dev/null || true)" = "$key" ]; then
    echo "demo models in $out are up to date (builder $key)"
    exit 0
fi
rm -f "$out/BUILD_KEY"
online-dpo build-demo-models --out "$out" --policy-steps "${DEMO_POLICY_STEPS:-500}"
# Written last: an interrupted build is redone on the next start.
echo "$key" >"$out/BUILD_KEY"
