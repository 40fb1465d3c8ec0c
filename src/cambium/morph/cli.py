"""`cambium morph ...`: train a morphogenetic CIFAR-10 run (or its static baseline), resume one, show a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cambium.core import cli_options as options
from cambium.core.config import load
from cambium.core.runs import get_run
from cambium.morph.config import CONFIG_MODEL

__all__ = ["app", "demo"]

app = typer.Typer(help="Morphogenetic training: seeds grow into the host where it needs capacity.",
                  no_args_is_help=True, add_completion=False)

ConfigOpt = Annotated[Path, typer.Option("--config", help="TOML config (configs/morph/*.toml)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config value: section.key=value")]


@app.command("train")
def train_command(
    config: Path | None = options.CONFIG,
    overrides: list[str] = options.SET,
    no_morphogenetic: Annotated[bool, typer.Option("--no-morphogenetic", help="train the host alone (baseline)")]
    = False,
    resume: str | None = options.RESUME,
    device: str | None = options.DEVICE,
    runs_dir: Path = options.RUNS_DIR,
    bus_namespace: Annotated[str | None, typer.Option(
        help="with REDIS_URL: the Redis key prefix of the run's bus streams (default oona:<run id>); compile workers "
        "(`library.compile_in = \"workers\"`) are started with the same --namespace")] = None,
) -> None:
    """Train the host CNN on CIFAR-10 with seeds (or without, for the baseline); prints the report summary."""
    import os

    from cambium.core.loop import load_run_config
    from cambium.core.progress import ProgressReporter
    from cambium.morph.backends import Endpoints
    from cambium.morph.train import train

    sets = list(overrides)
    if no_morphogenetic:
        sets.append("train.morphogenetic=false")
    if config is None and resume is None:
        config = Path("configs/morph/cifar10-cpu.toml")
    cfg = load_run_config(CONFIG_MODEL, runs_dir, config=config, resume=resume, overrides=sets, device=device)
    if resume is not None:
        name = get_run(runs_dir, resume).name
    else:
        assert config is not None
        name = config.stem + ("-static" if no_morphogenetic else "")
    _print_summary(train(cfg, name=name, runs_root=runs_dir, resume=resume, reporter=ProgressReporter.from_env(),
                         measure_peak=True, endpoints=Endpoints.from_env(os.environ), bus_namespace=bus_namespace))


@app.command("compare")
def compare_command(
    config: ConfigOpt = Path("configs/morph/cifar10-cpu.toml"),
    overrides: SetOpt = None,
    runs_dir: Path = options.RUNS_DIR,
    reuse: Annotated[bool, typer.Option("--reuse", help="read back arms already finished in --runs-dir (same name "
                                        "and config) instead of training them again")] = False,
) -> None:
    """MOR-11: train morphogenetic, same-host static and larger static runs; write report.md and figures."""
    from cambium.morph.compare import compare, summarize

    cfg = load(config, CONFIG_MODEL, list(overrides or []))
    result = compare(cfg, name=config.stem, runs_root=runs_dir, reuse=reuse)
    for arm in result.arms:
        typer.echo(f"{arm.label:>12} seed {arm.train_seed}: val_acc {arm.report['val_acc']:.4f} "
                   f"test_acc {arm.report['test_acc']:.4f} params {arm.report['params']} widths {list(arm.widths)} "
                   f"(run {arm.run_id})")
    summary = summarize(result)
    for name, e in summary["paired"].items():
        typer.echo(f"{name}: val_acc {e['val_acc']['mean']:+.4f} ± {e['val_acc']['sd']:.4f}, test_acc "
                   f"{e['test_acc']['mean']:+.4f} ± {e['test_acc']['sd']:.4f} over {e['seeds']} seed(s)")
    typer.echo(f"report: {result.report_path}")


@app.command("serve")
def serve_command(
    config: Annotated[Path | None, typer.Option("--config", help="morph TOML: policy, adaptation budget and "
                                                "library.root (default: the built-in defaults)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; beyond loopback only with CAMBIUM_API_TOKEN")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8765,
    bucket: Annotated[str, typer.Option(help="S3 bucket of the artifacts (with S3_ENDPOINT_URL)")] = "cambium-urza",
    namespace: Annotated[str, typer.Option(help="Redis key prefix of the bus streams (with REDIS_URL)")] = "oona",
) -> None:
    """MOR-9: serve the Urza, Tamiyo and Kasmina HTTP APIs (OpenAPI at /openapi.json) on the backends the
    environment names (REDIS_URL, DATABASE_URL, S3_ENDPOINT_URL; bearer token CAMBIUM_API_TOKEN)."""
    import os

    import uvicorn

    from cambium.morph.api import check_bind, create_app
    from cambium.morph.backends import Endpoints, open_bus, open_urza
    from cambium.morph.config import MorphConfig
    from cambium.morph.services import TamiyoService

    cfg = load(config, CONFIG_MODEL) if config is not None else MorphConfig()
    ends = Endpoints.from_env(os.environ)
    check_bind(host, ends.api_token)
    urza = open_urza(ends, cfg.library.root, bucket=bucket)
    bus = open_bus(ends, namespace=namespace, retention=cfg.bus.retention)
    tamiyo = TamiyoService(urza, cfg.policy, cfg.lifecycle.max_adaptations_per_epoch, policy_root=cfg.library.root)
    typer.echo(f"morph services on http://{host}:{port} (OpenAPI: /openapi.json; auth: "
               f"{'bearer token' if ends.api_token else 'none, loopback only'})")
    try:
        uvicorn.run(create_app(urza, bus, token=ends.api_token, tamiyo=tamiyo), host=host, port=port,
                    log_level="warning")
    finally:
        bus.close()


@app.command("worker")
def worker_command(
    consumer: Annotated[str, typer.Option(help="this worker's name in the consumer group (unique per worker)")],
    config: Annotated[Path | None, typer.Option("--config", help="morph TOML (library.root and benchmark "
                                                "settings)")] = None,
    min_idle: Annotated[float, typer.Option(help="claim requests another worker has held this many seconds")]
    = 30.0,
    bucket: Annotated[str, typer.Option(help="S3 bucket of the artifacts (with S3_ENDPOINT_URL)")] = "cambium-urza",
    namespace: Annotated[str, typer.Option(help="Redis key prefix of the bus streams")] = "oona",
) -> None:
    """Run a Tezzeret compile worker over REDIS_URL (and DATABASE_URL / S3_ENDPOINT_URL) until SIGTERM or Ctrl-C."""
    import os
    import signal
    import threading

    from cambium.core.errors import ConfigError
    from cambium.morph.backends import Endpoints, open_bus, open_urza
    from cambium.morph.config import MorphConfig
    from cambium.morph.worker import run_compile_worker

    cfg = load(config, CONFIG_MODEL) if config is not None else MorphConfig()
    ends = Endpoints.from_env(os.environ)
    if ends.redis_url is None:
        raise ConfigError("a compile worker needs REDIS_URL: with the in-process bus nothing could reach it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bus = open_bus(ends, namespace=namespace, retention=cfg.bus.retention)
    typer.echo(f"tezzeret worker {consumer} serving compilation.blueprint.submitted")
    try:
        stats = run_compile_worker(bus, open_urza(ends, cfg.library.root, bucket=bucket), consumer=consumer,
                                   stop=stop, min_idle_s=min_idle, benchmark_batch=cfg.library.benchmark_batch,
                                   benchmark_repeats=cfg.library.benchmark_repeats)
    except KeyboardInterrupt:
        return
    finally:
        bus.close()
    typer.echo(f"tezzeret worker {consumer}: compiled {stats.compiled}, failed {stats.failed}, "
               f"claimed {stats.claimed} from dead workers")


@app.command("simic")
def simic_command(
    library: Annotated[Path, typer.Option(help="library root whose replay buffer it trains from (its urza.sqlite, "
                                          "or DATABASE_URL when set)")],
    out: Annotated[Path, typer.Option(help="policy file to write (safetensors with a hashed JSON header)")],
    config: Annotated[Path | None, typer.Option("--config", help="morph TOML: the policy's blueprint lists and the "
                                                "adaptation budget (default: the built-in defaults)")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the recorded boundaries")] = 150,
    beta: Annotated[float, typer.Option(min=0.0, help="AWR temperature; 0 = pure behaviour cloning")] = 1.0,
    hidden: Annotated[int, typer.Option(min=1, max=4096, help="width of the GNN")] = 64,
    layers: Annotated[int, typer.Option(min=0, max=64, help="message-passing rounds")] = 3,
    seed: Annotated[int, typer.Option(min=0, help="RNG seed (initialisation, held-out runs, batch order)")] = 0,
) -> None:
    """MOR-6: train Tamiyo's GNN policy offline (Simic) from the boundaries and FieldReports a library recorded."""
    import os

    from cambium.morph.backends import Endpoints, open_urza
    from cambium.morph.config import MorphConfig
    from cambium.morph.simic import SimicConfig, train_simic

    cfg = load(config, CONFIG_MODEL) if config is not None else MorphConfig()
    urza = open_urza(Endpoints.from_env(os.environ), library)
    result = train_simic(urza, cfg.policy, cfg.lifecycle.max_adaptations_per_epoch,
                         SimicConfig(hidden=hidden, layers=layers, epochs=epochs, beta=beta, seed=seed), out=out)
    f = result.figures
    typer.echo(f"simic: {f['boundaries']} boundaries from {f['runs']} run(s), final loss {f['final_loss']:.4f}")
    for split in ("train", "val"):
        e = f[split]
        if e is not None:
            typer.echo(f"  {split}: imitation accuracy {e['accuracy']:.3f} over {e['samples']} legal seeds "
                       f"(random policy {e['random_accuracy']:.3f})")
    typer.echo(f"policy: {out} (tensors sha256 {result.header['tensors_sha256'][:12]}...)")


@app.command("check-services")
def check_services_command(
    config: Annotated[Path | None, typer.Option("--config", help="morph TOML (its library.root is checked)")] = None,
    bucket: Annotated[str, typer.Option(help="S3 bucket of the artifacts (with S3_ENDPOINT_URL)")] = "cambium-urza",
) -> None:
    """Report the health of each morph backend (bus, metadata, artifacts, API token); exit 1 if one is down."""
    import os

    from cambium.morph.backends import Endpoints, check_services
    from cambium.morph.config import MorphConfig

    cfg = load(config, CONFIG_MODEL) if config is not None else MorphConfig()
    rows = check_services(Endpoints.from_env(os.environ), cfg.library.root, bucket=bucket)
    for r in rows:
        typer.echo(f"{'ok  ' if r.ok else 'DOWN'} {r.service:<15} {r.backend:<40} {r.latency_ms:7.1f} ms  {r.detail}")
    if not all(r.ok for r in rows):
        raise typer.Exit(1)


@app.command("report")
def report_command(run: Annotated[str, typer.Argument(help="run id or unique prefix")],
                   runs_dir: Path = options.RUNS_DIR) -> None:
    """Accuracy, parameters and the seed timeline of a finished run."""
    record = get_run(runs_dir, run)
    path = record.dir / "report.json"
    if not path.is_file():
        typer.echo(f"run {record.id} has no report.json yet (still running or stopped early)")
        raise typer.Exit(1)
    _print_summary(json.loads(path.read_text()))


def _print_summary(report: dict[str, Any]) -> None:
    typer.echo(f"run {report['run_id']}: val_acc {report['val_acc']:.4f} test_acc {report['test_acc']:.4f} "
               f"params {report['params']} (host {report['host_params']}) after {report['epochs_done']} epochs")
    for loc, seed in report.get("seeds", {}).items():
        steps = " → ".join(f"{c['target']}@{c['epoch']}" for c in seed["timeline"]) or "DORMANT"
        typer.echo(f"  seed {loc}: {steps}")


def demo(runs_dir: Path = Path("runs")) -> None:
    """A seconds-long morph run on 512 CIFAR-10 images (configs/morph/tiny.toml), registered under `runs_dir`."""
    from cambium.morph.train import train

    cfg = load(Path("configs/morph/tiny.toml"), CONFIG_MODEL, [f"library.root={runs_dir / 'urza'}"])
    _print_summary(train(cfg, name="demo", runs_root=runs_dir))


@app.command("demo")
def demo_command(runs_dir: Path = options.RUNS_DIR) -> None:
    """A seconds-long morph run on 512 CIFAR-10 images (configs/morph/tiny.toml)."""
    demo(runs_dir)
