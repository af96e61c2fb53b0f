#!/bin/sh
# Entry point of the lenscan images: run a Dask scheduler or worker by argument.
#   scheduler [ARGS]     dask scheduler ARGS
#   worker [ARGS]        dask worker ARGS          (CPU workers)
#   cuda-worker [ARGS]   dask cuda worker ARGS     (one worker per GPU; GPU image only)
#   anything else        run it as given (dask-kubernetes and dask-cloudprovider pass their own
#                        dask-scheduler / dask worker / python -m ... commands)
set -e
case "${1:-}" in
  scheduler) shift; exec dask scheduler "$@" ;;
  worker) shift; exec dask worker "$@" ;;
  cuda-worker) shift; exec dask cuda worker "$@" ;;
  "") echo "usage: entrypoint.sh scheduler|worker|cuda-worker [ARGS] (or any command)" >&2; exit 2 ;;
  *) exec "$@" ;;
esac
