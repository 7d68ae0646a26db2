"""Running a list of tasks (sweep cells or capacity searches) on a backend: serial, a local process pool (the
default: nothing beyond the core install), or Ray (`pip install 'echo-spec[ray]'`; a local Ray started here, or
an existing cluster by address, whose workers must see the output folder, e.g. on a shared filesystem).

Every task is a top-level function of plain JSON-able data, so every backend ships the same work and writes the
same files; results come back in task order whatever order they finish in."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from echosim.sim.errors import SimError

BACKENDS = ("pool", "serial", "ray")


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _bar(total: int, done: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="cell", desc=desc, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1)


def run_tasks(fn: Callable, args: Sequence[tuple], backend: str = "pool", jobs: int | None = None,
              ray_address: str | None = None, progress: bool = True, skipped: int = 0, desc: str = "sweep",
              on_result: Callable[[int, object], None] | None = None, sizes: Sequence[int] | None = None,
              preload: Sequence[str] = ()) -> list:
    """fn(*a) for every a in args on the backend; results in order. `skipped` counts work already done (the bar
    starts there, so its ETA covers only what is left); sizes[i]: how many units (cells) task i holds, for the
    bar. on_result(i, result) runs in this process as each task finishes. preload: modules the pool's fork
    server imports once, so that each worker starts with them (instead of importing them again)."""
    if backend not in BACKENDS:
        raise SimError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}", field="backend")
    jobs = jobs or default_jobs()
    if jobs < 1:
        raise SimError(f"jobs must be >= 1, got {jobs}", field="jobs")
    results: list = [None] * len(args)
    sizes = list(sizes) if sizes is not None else [1] * len(args)
    bar = _bar(skipped + sum(sizes), skipped, progress, desc)

    def finished(i: int, result) -> None:
        results[i] = result
        if on_result is not None:
            on_result(i, result)
        if bar is not None:
            bar.update(sizes[i])

    try:
        if not args:
            pass
        elif backend == "serial" or (backend == "pool" and (jobs == 1 or len(args) == 1)):
            for i, a in enumerate(args):
                finished(i, fn(*a))
        elif backend == "pool":
            _run_pool(fn, args, jobs, finished, preload)
        else:
            _run_ray(fn, args, jobs, ray_address, finished)
    finally:
        if bar is not None:
            bar.close()
    return results


def _run_pool(fn, args, jobs: int, finished, preload: Sequence[str] = ()) -> None:
    import multiprocessing as mp

    # forkserver: workers fork from a clean server process, not from a caller that may hold threads (Streamlit)
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    if preload and ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([fn.__module__, *preload])  # no effect once the server runs: it has them
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(args)), mp_context=ctx)
    try:
        pending = {pool.submit(fn, *a): i for i, a in enumerate(args)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                finished(pending.pop(fut), fut.result())
    except BaseException:
        # interrupted (or a cell failed): stop the running cells now rather than let them finish unseen; a
        # killed cell leaves only its temporary folder, which the next run removes
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:  # gone before the caller lists what finished
            proc.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _run_ray(fn, args, jobs: int, address: str | None, finished) -> None:
    try:
        import ray
    except ImportError:
        raise SimError("--ray needs Ray: pip install 'echo-spec[ray]'", field="ray") from None
    started = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                      configure_logging=False)
        if address:
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SimError(f"cannot join the Ray cluster at {address!r}: {msg}", field="ray_address") from None
        else:  # a local Ray for this sweep; its workers inherit this environment (PYTHONPATH included)
            ray.init(num_cpus=jobs, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
                     **kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        refs = {remote.remote(*a): i for i, a in enumerate(args)}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i = refs.pop(ref)
                try:
                    finished(i, ray.get(ref))
                except ray.exceptions.RayTaskError as exc:  # the task's own error, as the pool raises it
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
    except BaseException:
        for ref in list(locals().get("refs", {})):
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
