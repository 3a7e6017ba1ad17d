"""Deconvolve a slide-sized OME-Zarr image on a SLURM cluster (dask-jobqueue).

    python examples/slurm_deconvolve.py IN.ome.zarr OUT.zarr --operator OP.zarr --jobs 8
    python examples/slurm_deconvolve.py --dry-run --cores 8 --memory 32GB   # print the job script, submit nothing

Site settings (partition, account, cores, memory, walltime) belong in the Dask configuration,
``~/.config/dask/jobqueue.yaml``, for example::

    jobqueue:
      slurm:
        cores: 8
        processes: 2          # workers per job
        memory: 32GB
        walltime: "02:00:00"
        queue: normal
        account: mylab
        local-directory: $TMPDIR

The options below override them for one run. The same job from the command line:
``lsfov deconvolve IN OUT --operator OP --scheduler slurm:8``.
"""
import argparse
import shutil
from pathlib import Path

from lsfov.cluster import jobqueue_cluster


def make_cluster(cores=None, memory=None, walltime=None, queue=None, account=None):
    settings = {k: v for k, v in dict(cores=cores, memory=memory, walltime=walltime, queue=queue,
                                      account=account).items() if v is not None}
    return jobqueue_cluster("slurm", **settings)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--operator")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--background", type=float, default=0.0, help="the camera's offset in counts (subtracted)")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--cores", type=int)
    p.add_argument("--memory")
    p.add_argument("--walltime")
    p.add_argument("--queue")
    p.add_argument("--account")
    p.add_argument("--dry-run", action="store_true", help="print the job script and stop")
    p.add_argument("--resume", action="store_true", help="continue a job that stopped (its OUT.scratch)")
    a = p.parse_args()
    try:
        cluster = make_cluster(a.cores, a.memory, a.walltime, a.queue, a.account)
    except ValueError as e:  # e.g. no job size in the Dask configuration: one line, not a traceback
        p.error(str(e))
    with cluster:
        print(cluster.job_script())
        if a.dry_run:
            return
        if not (a.src and a.out and a.operator):
            p.error("give SRC, OUT and --operator (or --dry-run)")
        if Path(a.out).exists():  # before any job is paid for: the result is written only at the end
            p.error(f"{a.out} already exists; remove it or give another OUT")
        import xarray as xr
        from distributed import Client

        import lsfov

        if shutil.which("sbatch") is None:
            p.error("sbatch is not on PATH: run this on a SLURM login node")
        cluster.scale(jobs=a.jobs)
        with Client(cluster) as client:
            print("dashboard:", client.dashboard_link)
            img = lsfov.open_image(a.src, chunks=2048)
            op = lsfov.ProductConvolution.load(a.operator)
            # Scratch on a file system every node sees (next to the output); kept if the job stops
            # (--resume continues it), removed once the output is written.
            x = lsfov.deconvolve(img, op, a.iterations, background=a.background, scratch=a.out + ".scratch",
                                 resume=a.resume)
            lsfov.save(xr.Dataset({"deblurred": x}), a.out, progress=True)
        shutil.rmtree(a.out + ".scratch", ignore_errors=True)


if __name__ == "__main__":
    main()
