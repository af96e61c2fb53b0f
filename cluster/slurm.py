"""Scan a survey on SLURM worker jobs started by dask-jobqueue (``pip install dask-jobqueue``).

Usage: python cluster/slurm.py SURVEY_URL OUT --jobs 8
Edit the SLURMCluster arguments (queue, account, walltime, resources) for your site.
"""

from __future__ import annotations

import argparse

from distributed import Client

import lenscan


def main() -> None:
    from dask_jobqueue import SLURMCluster

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("survey_url")
    p.add_argument("out")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs (one Dask worker each)")
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    args = p.parse_args()
    cluster = SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=8,
        processes=1,
        memory="32GB",
        walltime="04:00:00",
        job_script_prologue=["export OMP_NUM_THREADS=8"],
    )
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        client.wait_for_workers(1)
        table = lenscan.scan(args.survey_url, out=args.out, client=client)
        print(table.meta["summary"])
    cluster.close()


if __name__ == "__main__":
    main()
