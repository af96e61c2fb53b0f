#!/bin/sh
# Container entrypoint of the lenscan web service (cluster/Dockerfile.serve).
#
# Settings come from the environment, so the same image serves any model or survey:
#   LENSCAN_MODELS           bundled model names or checkpoint paths, space-separated
#                            (default: the bundled model); the first is the default model
#   LENSCAN_SURVEY           survey store URL for POST /score/positions (unset: no survey)
#   LENSCAN_STORAGE_OPTIONS  fsspec options for the survey, JSON (e.g. {"anon": true})
#   LENSCAN_ROOT_PATH        URL prefix when a proxy mounts the service under a path
#   LENSCAN_FORWARDED_ALLOW_IPS  proxies trusted for X-Forwarded-* headers (default: all,
#                            since only the proxy can reach the container's port)
#   LENSCAN_MAX_UPLOAD_MB    largest request body in MiB (default 64)
#   LENSCAN_MAX_STAMPS, LENSCAN_MAX_POSITIONS, LENSCAN_MAX_JSON_STAMPS, LENSCAN_MAX_INFLIGHT,
#   LENSCAN_MAX_INFLIGHT_MB, LENSCAN_PARSE_WORKERS, LENSCAN_BATCH_WINDOW_MS, LENSCAN_MAX_BATCH,
#   LENSCAN_TORCH_THREADS, LENSCAN_DEVICE
#                            the `lenscan serve` option of the same name (--max-stamps, ...);
#                            unset: that option's default (`lenscan serve --help`)
#   HOST, PORT               address and port to listen on (default 0.0.0.0:8000)
# Any arguments are passed on to `lenscan serve` (e.g. --device cuda --batch-window-ms 10).
set -eu

set -- --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
    --forwarded-allow-ips "${LENSCAN_FORWARDED_ALLOW_IPS:-*}" \
    --max-upload-mb "${LENSCAN_MAX_UPLOAD_MB:-64}" "$@"
for setting in MAX_STAMPS MAX_POSITIONS MAX_JSON_STAMPS MAX_INFLIGHT MAX_INFLIGHT_MB \
    PARSE_WORKERS BATCH_WINDOW_MS MAX_BATCH TORCH_THREADS DEVICE; do
    eval "value=\${LENSCAN_${setting}:-}"
    if [ -n "${value}" ]; then
        flag=$(printf '%s' "${setting}" | tr 'A-Z_' 'a-z-')
        set -- "--${flag}" "${value}" "$@"
    fi
done
if [ -n "${LENSCAN_MODELS:-}" ]; then
    # Word splitting is wanted here: one argument per model.
    # shellcheck disable=SC2086
    set -- --model ${LENSCAN_MODELS} "$@"
fi
if [ -n "${LENSCAN_SURVEY:-}" ]; then
    set -- --survey "${LENSCAN_SURVEY}" "$@"
fi
if [ -n "${LENSCAN_STORAGE_OPTIONS:-}" ]; then
    set -- --storage-options "${LENSCAN_STORAGE_OPTIONS}" "$@"
fi
if [ -n "${LENSCAN_ROOT_PATH:-}" ]; then
    set -- --root-path "${LENSCAN_ROOT_PATH}" "$@"
fi
exec lenscan serve "$@"
