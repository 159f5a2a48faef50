#!/bin/sh
# `trainer` service: `online-dpo train` on $TRAINER_CONFIG. The reward URL(s) come from
# $REWARD_URLS (comma- or space-separated), the API key from $REWARD_API_KEY, and any extra
# flags from $TRAINER_ARGS (e.g. "--max_steps 50"); arguments given to this script come first.
set -eu
set -- --config "${TRAINER_CONFIG:-/config/trainer-demo.yaml}" "$@"
if [ -n "${REWARD_URLS:-}" ]; then
    # shellcheck disable=SC2086  # one flag value per URL
    set -- "$@" --reward_url $REWARD_URLS
fi
if [ -n "${REWARD_API_KEY:-}" ]; then
    set -- "$@" --reward_api_key "$REWARD_API_KEY"
fi
# shellcheck disable=SC2086  # TRAINER_ARGS is a list of flags
exec online-dpo train "$@" ${TRAINER_ARGS:-}
