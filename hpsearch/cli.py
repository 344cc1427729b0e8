"""The `hpsearch` command: a thin click layer over the library (parse, call, echo)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from hpsearch.errors import HPSearchError

SPEC = click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
STORAGE = click.option("--storage", envvar="HPSEARCH_STORAGE", default=None,
                       help="Optuna storage URL; overrides the spec's study.storage. [env HPSEARCH_STORAGE]")
TRACKING = click.option("--tracking-uri", envvar="HPSEARCH_TRACKING_URI", default=None,
                        help="MLflow tracking URI; overrides the spec's tracking.uri. [env HPSEARCH_TRACKING_URI]")
DATA_DIR = click.option("--data-dir", envvar="HPSEARCH_DATA_DIR", default=None, type=click.Path(file_okay=False),
                        help="Where torchvision-format datasets are looked for first. [env HPSEARCH_DATA_DIR]")
RUNS_DIR = click.option("--runs-dir", envvar="HPSEARCH_RUNS_DIR", default=None, type=click.Path(file_okay=False),
                        help="Folder of the embedded stores, artifacts and caches (default ./runs). "
                             "[env HPSEARCH_RUNS_DIR]")



class _PackSize(click.ParamType):
    name = "K|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"must be a positive integer (trials a worker trains together) or 'auto', but got {value!r}.",
                  param, ctx)


PACK = click.option("--pack", type=_PackSize(), default=None,
                    help="Trials each worker trains together (a trial pack); overrides the spec's study.pack. "
                         "[default: the spec's, auto: 1 on the CPU]")


def _with_pack(spec: Any, pack: int | str | None) -> Any:
    """Return ``spec`` with ``--pack`` (when given) as its study.pack."""
    import dataclasses

    if pack is None:
        return spec
    return dataclasses.replace(spec, study=dataclasses.replace(spec.study, pack=None if pack == "auto" else pack))


class _Group(click.Group):
    """Turns hpsearch's own errors into `Error: ...` with exit 1 and no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HPSearchError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(package_name="hpsearch")
@click.option("-v", "--verbose", is_flag=True, help="Show hpsearch's debug lines, and Optuna's and MLflow's own "
                                                   "log lines.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors, not what hpsearch waits for or "
                                                 "decides (a study stopping early, a storage back).")
def cli(verbose: bool, quiet: bool) -> None:
    """Declared hyperparameter searches for PyTorch models (Optuna + MLflow)."""
    import logging

    from hpsearch.log import show

    if verbose and quiet:
        raise click.UsageError("give -v/--verbose or -q/--quiet, not both.")
    show(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep the progress line readable: Optuna's per-trial INFO lines and MLflow's INFO go."""
    import logging
    import os
    import warnings

    from optuna.exceptions import ExperimentalWarning

    # Heartbeats, grouped TPE and metric names are "experimental" in Optuna: we use them on purpose.
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow resets its logger on import
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _load(spec_path: str, **overrides: Any) -> Any:
    from hpsearch.spec import load_spec

    return load_spec(spec_path, **overrides)


@cli.command()
@SPEC
@STORAGE
@TRACKING
@DATA_DIR
@RUNS_DIR
@click.option("--json", "as_json", is_flag=True, help="Print the resolved spec as JSON.")
def validate(spec_path: str, storage: str | None, tracking_uri: str | None, data_dir: str | None,
             runs_dir: str | None, as_json: bool) -> None:
    """Check SPEC (and that its largest model fits this machine) and print its resolved settings; runs nothing."""
    from hpsearch.checks import check_memory, warn_about_splits

    spec = _load(spec_path, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir, runs_dir=runs_dir)
    size = check_memory(spec)
    warn_about_splits(spec)
    if as_json:
        click.echo(json.dumps(spec.to_dict(), indent=2))
        return
    click.echo(_describe(spec, size))


def _describe(spec: Any, size: Any) -> str:
    from hpsearch.spec import mask_password

    s, t = spec.study, spec.task
    lines = [
        f"{spec.path}: valid.",
        f"study    {s.name}: " + ", ".join(f"{m.direction} {m.name}" for m in s.metrics)
        + f"; {s.n_trials} trials in total" + (f", timeout {s.timeout:g} s" if s.timeout else "")
        + f"; seed {s.seed}",
        f"sampler  {s.sampler.type} {dict(s.sampler.options) or ''}".rstrip(),
        f"pruner   {s.pruner.type} {dict(s.pruner.options) or ''}".rstrip()
        + (f" wrapping {s.pruner.wrapped.type}" if s.pruner.wrapped else ""),
        f"storage  {mask_password(s.storage)}",
        f"task     {t.type} on {t.dataset}" + (f" (fallback {t.fallback})" if t.fallback else "")
        + f"; validation {t.val_fraction:g} of train; {t.epochs} epochs; batch {t.batch_size}; device {t.device}",
        f"model    {spec.model.family}",
        "space:",
    ]
    for p in spec.space:
        if p.type == "fixed":
            desc = f"= {p.value!r}"
        elif p.type == "categorical":
            desc = f"one of {list(p.choices)}"
        else:
            desc = f"{p.type} in [{p.low}, {p.high}]" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        if p.per_layer:
            desc += " per layer"
        if p.when:
            desc += " when " + ", ".join(f"{k} in {list(v)}" for k, v in p.when.items())
        lines.append(f"  {p.name:<15} {desc}")
    if s.enqueue:
        lines.append(f"enqueued {len(s.enqueue)} known-good configuration(s) first")
    lines.append(f"largest  {size.describe(spec.model.family)}")
    tr = spec.tracking
    lines.append(f"tracking {'MLflow ' + mask_password(tr.uri) + ', experiment ' + tr.experiment if tr.enabled else 'off'}")
    return "\n".join(lines)


@cli.command()
@SPEC
@STORAGE
@TRACKING
@DATA_DIR
@RUNS_DIR
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes sharing the study; n_trials stays the study's total and the CPU "
                   "threads are divided among them. [default: 1, or len(--gpus) x --workers-per-gpu]")
@click.option("--gpus", default=None, help="Comma-separated CUDA device ids to place workers on, e.g. 0,1; "
                                           "each worker sees only its GPU (CUDA_VISIBLE_DEVICES).")
@click.option("--workers-per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
              help="Workers per GPU listed in --gpus.")
@click.option("--device", default=None, help="Override task.device (auto, cpu, cuda, cuda:N, mps).")
@click.option("--allow-space-change", is_flag=True,
              help="Continue an existing study although its search space changed.")
@click.option("--no-finish", is_flag=True, help="Skip the final test evaluation and model registration.")
@click.option("--no-refit", is_flag=True, help="Test and register the best trial's own model instead of its "
                                               "configuration retrained on training + validation data.")
@PACK
def run(spec_path: str, storage: str | None, tracking_uri: str | None, data_dir: str | None, runs_dir: str | None,
        workers: int | None, gpus: str | None, workers_per_gpu: int, device: str | None, allow_space_change: bool,
        no_finish: bool, no_refit: bool, pack: int | str | None) -> None:
    """Run (or resume) the study in SPEC until its n_trials, then test and register the best model."""
    spec = _with_pack(_load(spec_path, storage=storage, tracking_uri=tracking_uri, data_dir=data_dir,
                            runs_dir=runs_dir), pack)
    from hpsearch import workers as workers_mod
    from hpsearch.progress import summary

    try:
        study = workers_mod.run_study(spec, workers=workers, gpus=gpus, workers_per_gpu=workers_per_gpu,
                                      device=device, allow_space_change=allow_space_change)
    except KeyboardInterrupt:
        click.echo("\nInterrupted: finished trials are kept, none is left running. Run the same command to "
                   "resume.", err=True)
        sys.exit(130)
    result: dict[str, Any] = {}
    if not no_finish:
        from hpsearch.finish import finish

        try:
            result = finish(spec, study, device=device, use_refit=False if no_refit else None)
        except KeyboardInterrupt:
            click.echo("\nInterrupted before the final test was recorded: nothing of it was kept. Run the same "
                       "command to test and register the best model.", err=True)
            sys.exit(130)
    click.echo(summary(spec, study, result))


@cli.command()
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
@click.option("--study", "study_name", default=None, help="Join this study (with --storage) using its stored spec.")
@STORAGE
@TRACKING
@DATA_DIR
@RUNS_DIR
@click.option("--device", default=None, help="Override task.device (auto, cpu, cuda, cuda:N, mps).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for this worker.")
@click.option("--quiet", is_flag=True, help="No progress line (when a parent process shows one).")
@PACK
def worker(spec_path: str | None, study_name: str | None, storage: str | None, tracking_uri: str | None,
           data_dir: str | None, runs_dir: str | None, device: str | None, threads: int | None, quiet: bool,
           pack: int | str | None) -> None:
    """Join a study as one more worker, until the study's total is reached.

    Either SPEC (refused if the study's stored spec differs) or --storage URL --study NAME.
    """
    from hpsearch.checks import check_memory
    from hpsearch.progress import Progress
    from hpsearch.study import open_study, setup_worker, work

    spec = _with_pack(_spec_or_stored(spec_path, storage, study_name, runs_dir, tracking_uri=tracking_uri,
                                      data_dir=data_dir), pack)
    check_memory(spec, device)
    study = open_study(spec)
    setup = setup_worker(spec, study, device=device, threads=threads)
    try:
        if quiet:
            ran = work(spec, study, setup, timeout=spec.study.timeout)
        else:
            with Progress(spec, study):
                ran = work(spec, study, setup, timeout=spec.study.timeout)
    except KeyboardInterrupt:
        if not quiet:  # under `hpsearch run --workers N` the parent says it, once
            click.echo("\nInterrupted: this worker's finished trials are kept, none is left running.", err=True)
        sys.exit(130)
    if not quiet:
        click.echo(f"worker done: ran {ran} trial(s) of study {spec.study.name!r}.")


def _spec_or_stored(spec_path: str | None, storage: str | None, study_name: str | None, runs_dir: str | None,
                    **overrides: Any) -> Any:
    """Return the spec: from SPEC, or the one stored in study NAME on storage URL."""
    from hpsearch.study import load_stored_spec

    if spec_path is None:
        if not (storage and study_name):
            raise click.UsageError("give a SPEC, or --storage URL and --study NAME.")
        return load_stored_spec(storage, study_name, runs_dir=runs_dir, **overrides)
    spec = _load(spec_path, storage=storage, runs_dir=runs_dir, **overrides)
    if study_name and study_name != spec.study.name:
        raise click.UsageError(f"--study {study_name!r} differs from the spec's study.name {spec.study.name!r}.")
    return spec


@cli.command()
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
@click.option("--study", "study_name", default=None, help="With --storage: the study to show.")
@STORAGE
@TRACKING
@RUNS_DIR
def status(spec_path: str | None, study_name: str | None, storage: str | None, tracking_uri: str | None,
           runs_dir: str | None) -> None:
    """Show a study's trials per state, best value, live workers and stale trials."""
    from hpsearch.workers import load_study, study_status

    spec = _spec_or_stored(spec_path, storage, study_name, runs_dir, tracking_uri=tracking_uri)
    click.echo(study_status(spec, load_study(spec)).describe())


@cli.command()
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False))
@click.option("--study", "study_name", default=None, help="With --storage: the study to clean up.")
@STORAGE
@TRACKING
@RUNS_DIR
def cleanup(spec_path: str | None, study_name: str | None, storage: str | None, tracking_uri: str | None,
            runs_dir: str | None) -> None:
    """Fail trials left RUNNING by dead workers (past the grace period) and retry them."""
    from hpsearch.workers import cleanup as clean
    from hpsearch.workers import load_study

    spec = _spec_or_stored(spec_path, storage, study_name, runs_dir, tracking_uri=tracking_uri)
    failed = clean(spec, load_study(spec))
    if failed:
        click.echo(f"failed {len(failed)} stale trial(s): {', '.join(map(str, failed))}; "
                   f"each is retried with the same params (up to {spec.study.max_retries} times).")
    else:
        click.echo(f"no stale trials: every RUNNING trial sent a heartbeat within {spec.study.grace_period} s.")


HOST = click.option("--host", default="127.0.0.1", show_default=True,
                    help="Address to bind. Neither UI has a login: bind beyond 127.0.0.1 only on a trusted network.")


@cli.command()
@SPEC
@STORAGE
@RUNS_DIR
@HOST
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
def dashboard(spec_path: str, storage: str | None, runs_dir: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard on SPEC's study (trials, notes, images) until Ctrl-C."""
    from hpsearch import servers

    spec = _load(spec_path, storage=storage, runs_dir=runs_dir)
    sys.exit(servers.serve(servers.dashboard_command(spec, host, port), servers.browser_url(host, port),
                           click.echo, host=host, port=port, ready_path="/api/studies"))


@cli.command()
@SPEC
@TRACKING
@RUNS_DIR
@HOST
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def ui(spec_path: str, tracking_uri: str | None, runs_dir: str | None, host: str, port: int) -> None:
    """Serve the MLflow UI on SPEC's tracking store until Ctrl-C (or print the server's URL)."""
    from hpsearch import servers

    spec = _load(spec_path, tracking_uri=tracking_uri, runs_dir=runs_dir)
    if remote := servers.remote_ui_url(spec):
        click.echo(f"{spec.path} tracks to the MLflow server at {remote}: open it there.")
        return
    sys.exit(servers.serve(servers.ui_command(spec, host, port), servers.browser_url(host, port), click.echo,
                           host=host, port=port, ready_path="/health", page=servers.study_page(spec, click.echo)))


@cli.command("report")
@SPEC
@STORAGE
@TRACKING
@RUNS_DIR
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder to write into. [default: reports/<study name>/]")
def report_command(spec_path: str, storage: str | None, tracking_uri: str | None, runs_dir: str | None,
                   out_dir: str | None) -> None:
    """Write SPEC's study report: one self-contained HTML file and a markdown summary."""
    from hpsearch import report
    from hpsearch.record import open_existing

    spec = _load(spec_path, storage=storage, tracking_uri=tracking_uri, runs_dir=runs_dir)
    study = open_existing(spec.study.storage, spec.study.name, spec_path=spec.path)
    html_path, md_path = report.write_report(spec, study, out_dir or report.default_out_dir(spec))
    click.echo(f"wrote {html_path}\nwrote {md_path}")


def main() -> None:
    """Entry point of the console script."""
    cli(prog_name="hpsearch")
