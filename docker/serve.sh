#!/bin/sh
# `reward` service: the reward service on 0.0.0.0:8000, settings from REWARD_* variables.
# Compose sets REWARD_API_KEY to "" when no key is configured, and the service refuses a blank
# key (it would lock everyone out), so an empty one is removed here: no key, open access.
set -eu
if [ -z "${REWARD_API_KEY:-}" ]; then
    unset REWARD_API_KEY
fi
exec reward-service --host 0.0.0.0 --port 8000 "$@"
