"""The figures only an accelerator can give, in one short run that prints one table.

    bash benchmarks/gpu_check.sh --host .gpu-host --results DIR   # the GPU host: its own python3 and torch
    bash benchmarks/gpu_check.sh                    # on a 1-GPU host with network: venv + CUDA torch, then this
    python -m benchmarks.gpu_check [--work DIR] [--results DIR]   # the same, in an environment that has them
    python -m benchmarks.gpu_check --smoke          # CPU, tiny sizes: ~40 s of CPU (tests/test_gpu_check.py)

Every figure comes from the project's own code: step 1 runs through the flow's step runner
(`flows.runner.run_step`, a 1-worker Ray Train job with Ray Data), the plain loops and the Ray Data reader
come from benchmarks/train_throughput.py and benchmarks/data_pipeline.py, the export from models/export.py.
On a GPU the config is configs/default.yaml + configs/ms1mv3_r100.yaml with IResNet-50, 1 worker, batch 128
at 112 px and synthetic shards generated here first (data/synthetic.py, cached in --work); --smoke uses
configs/tiny.yaml on the CPU instead: the same code, except the CUDA calls.

1. Throughput of step 1 (bf16 autocast; channels_last is EQFaceNet's layout), images/s as a Ray Train job
   and as a plain PyTorch loop fed by a DataLoader with as many decode workers as Ray Data gets CPUs; their
   ratio. Then the same with fp16 + GradScaler. Best epoch of epochs 2..N; an epoch's figure includes
   starting its data iterator.
2. Stability: the fp16 job of (1) is also >= 300 iterations of the margin loss with the GradScaler: every
   epoch's loss finite, the final loss scale > 0, the steps the scaler skipped. Then the divergence guard:
   a job whose lr x weight_decay blows the weights up must stop on NonFiniteLossError, not train on.
3. The sharded head on the device: 1 worker, 100k identities, `model.head: sharded` with head_sample_rate
   0.1 against `model.head: full`: step time (batch / images/s) and peak GPU memory (torch.cuda).
4. Ray Data decode + augment images/s with every CPU of the host, beside the images/s (1) consumed.
5. ONNX: the trained network of (1) on the device exported and run in onnxruntime (CPU provider); the
   largest difference to the device's float32 outputs (TF32 off), relative to their magnitude.

A check that fails is marked FAIL in the table and the exit status is 1. Each check has a time cap of its own
(`Sizes.caps`) inside one budget for the run (`Sizes.budget_s`): a check past its cap is a FAIL row and the
next one runs. Each row prints as its check ends, and `--results DIR` gets, after every check, the table
(table.md) and the figures (figures.json); at the end also imports.txt, where each module this process
imported came from. A run cut off from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.data_pipeline import time_ray
from benchmarks.train_throughput import plain_dataloader, ray_step
from data import storage
from flows import checkpoints
from flows.config import Config, load_config, with_overrides
from flows.runner import Datasets, prepare_datasets
from flows.train_step import NonFiniteLossError
from models import export_onnx
from models.export import OUTPUTS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# lr x weight_decay far past SGD's stability limit: the weights grow ~19x a step until the loss is not finite
# (tests/test_faults_training.py diverges the tiny flow the same way).
DIVERGING = {"step1.lr": 2000.0, "step1.weight_decay": 0.01, "step1.warmup_epochs": 0.0}
ONNX_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Sizes:
    """How big each check is: the GPU run's and the CPU smoke's."""

    files: tuple[str, ...]
    overrides: tuple[str, ...]
    identities: int
    per_identity: int
    epochs: int  # of each throughput job (best of epochs 2..N)
    stability_iterations: int
    head_classes: int
    head_epochs: int
    caps: dict[str, float]  # seconds per check (the dataset's generation counts as one)
    budget_s: float  # the whole run: a check gets at most what is left of it


class CheckTimeout(Exception):
    """A check ran past its time cap."""


GPU = Sizes(
    files=("default.yaml", "ms1mv3_r100.yaml"),
    overrides=("model.backbone=r50", "model.head=full", "model.head_sample_rate=1.0", "step1.batch_size=128",
               "scaling.use_gpu=true", "data.shuffle_buffer=4096"),
    identities=250, per_identity=32, epochs=3, stability_iterations=300, head_classes=100_000, head_epochs=2,
    # The host is lent 15 minutes, its start included: two runs of ~6 minutes (unpacking, Python's start and
    # these 330 s under gpu_check.sh's 345 s timeout) fit, so a failed first run can be rerun at once.
    caps={"dataset": 45, "throughput": 120, "stability": 40, "head": 60, "pipeline": 30, "onnx": 35}, budget_s=330,
)
SMOKE = Sizes(
    files=("default.yaml", "tiny.yaml"),
    overrides=("model.backbone=r18", "model.width_mult=0.125", "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5"),
    identities=8, per_identity=8, epochs=1, stability_iterations=8, head_classes=256, head_epochs=1,
    # A loaded 2-core CI machine: caps that only a hung check reaches.
    caps={"dataset": 300, "throughput": 600, "stability": 300, "head": 300, "pipeline": 300, "onnx": 300},
    budget_s=1500,
)


@dataclass
class Report:
    """The table's rows and the figures behind them (--json)."""

    rows: list[tuple[str, str, str, bool | None]] = field(default_factory=list)
    figures: dict[str, float | int | str | bool] = field(default_factory=dict)
    header: str = ""
    results: Path | None = None  # --results: rewritten after every check
    printed: int = 0  # rows already printed

    def add(self, section: str, what: str, value: str, ok: bool | None = None, **figures) -> None:
        self.rows.append((section, what, value, ok))
        self.figures.update(figures)

    @property
    def failed(self) -> list[str]:
        return [f"{s}: {w}" for s, w, _, ok in self.rows if ok is False]

    def table(self) -> str:
        return "\n".join(TABLE_HEAD + [row_line(row) for row in self.rows])

    def flush(self) -> None:
        """Prints the rows added since the last call, and writes the results folder."""
        if self.printed == 0:
            print("\n".join(["", self.header, "", *TABLE_HEAD]), flush=True)
        for row in self.rows[self.printed:]:
            print(row_line(row), flush=True)
        self.printed = len(self.rows)
        if self.results is not None:  # whole files only: a run cut off mid-write leaves the previous ones
            storage.write_bytes_atomic(str(self.results / "table.md"), f"{self.header}\n\n{self.table()}\n".encode())
            storage.write_bytes_atomic(str(self.results / "figures.json"), self.as_json().encode())

    def as_json(self) -> str:
        return json.dumps({"rows": self.rows, "figures": self.figures}, indent=1)


TABLE_HEAD = ["| check | measure | figure | |", "|---|---|---|---|"]


def row_line(row: tuple[str, str, str, bool | None]) -> str:
    section, what, value, ok = row
    return f"| {section} | {what} | {value} | {'' if ok is None else 'ok' if ok else 'FAIL'} |"


def write_imports(path: Path) -> None:
    """Where each module of this process came from: tests/test_gpu_check.py holds them to the host's packages,
    the carried folder and this repository."""
    lines = sorted(f"{name}\t{getattr(mod, '__file__', None) or ''}" for name, mod in list(sys.modules.items()))
    storage.write_bytes_atomic(str(path), ("\n".join(lines) + "\n").encode())


def base_config(sizes: Sizes, work: Path) -> Config:
    return load_config([CONFIGS / f for f in sizes.files], [
        "flow.name=gpu-check", f"flow.storage={work / 'runs'}", "flow.max_failures=0",
        "data.train=synthetic", "data.val=null", f"data.cache_root={work / 'datasets'}",
        f"data.synthetic.num_identities={sizes.identities}", f"data.synthetic.train_per_identity={sizes.per_identity}",
        "data.synthetic.val_per_identity=1", "scaling.num_workers=1", "scaling.amp=bf16", *sizes.overrides])


def best(rates: list[float]) -> float:
    return max(rates[1:] or rates)


def decode_workers(cfg: Config) -> int:
    """The CPUs Ray Data has beside the training worker: the plain loop's DataLoader gets as many."""
    return max(1, int((os.cpu_count() or 1) - cfg.scaling.cpus_per_worker))


def check_throughput(cfg: Config, data: Datasets, sizes: Sizes, device: torch.device, report: Report,
                     jobs: dict) -> None:
    """(1) and (2): per precision a plain DataLoader loop (before Ray starts: no fork after ray.init), then
    the Ray jobs, each put into `jobs` as {amp: (history, checkpoint)} once it has run."""
    fp16_epochs = max(sizes.epochs, math.ceil(sizes.stability_iterations / iterations_per_epoch(cfg, data)))
    plans = {"bf16": sizes.epochs, "fp16": fp16_epochs}
    plain = {}
    torch.set_num_threads(cfg.scaling.threads_per_worker or os.cpu_count() or 1)  # as the Ray worker
    for amp in plans:
        plain[amp] = best(plain_dataloader(with_overrides(cfg, {"scaling.amp": amp}), data, sizes.epochs, device,
                                           decode_workers(cfg)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    start_ray(device)
    for amp, epochs in plans.items():
        jobs[amp] = ray_step(with_overrides(cfg, {"scaling.amp": amp}), data, epochs, f"throughput-{amp}",
                             str(Path(cfg.flow.storage)))
        rates = [m["images_per_s"] for m in jobs[amp][0]]
        ray_rate = best(rates[:sizes.epochs])
        label = "bf16" if amp == "bf16" else "fp16 + GradScaler"
        section = f"1 throughput {label}"
        report.add(section, "Ray Train 1 worker + Ray Data", f"{ray_rate:,.0f} img/s",
                   **{f"throughput.{amp}.ray_images_per_s": ray_rate})
        report.add(section, f"plain loop + DataLoader ({decode_workers(cfg)} workers)", f"{plain[amp]:,.0f} img/s",
                   **{f"throughput.{amp}.plain_images_per_s": plain[amp]})
        report.add(section, "ratio Ray / plain", f"{ray_rate / plain[amp]:.3f}",
                   **{f"throughput.{amp}.ratio": ray_rate / plain[amp]})


def iterations_per_epoch(cfg: Config, data: Datasets) -> int:
    return max(1, data.num_train // (cfg.step1.batch_size * cfg.scaling.num_workers))


def check_stability(cfg: Config, data: Datasets, fp16_history: list[dict], report: Report) -> None:
    """(2): the fp16 job's epochs, then a job that must diverge and be stopped."""
    iterations = iterations_per_epoch(cfg, data) * len(fp16_history)
    losses = [m["loss"] for m in fp16_history]
    finite = all(math.isfinite(v) for v in losses)
    scale = fp16_history[-1].get("amp_scale", 0.0)
    skipped = int(sum(m.get("amp_skipped_steps", 0) for m in fp16_history))
    report.add("2 stability fp16", f"{iterations} iterations, margin loss", f"loss {losses[0]:.2f} -> {losses[-1]:.2f}",
               finite, **{"stability.iterations": iterations, "stability.losses_finite": finite,
                          "stability.first_loss": losses[0], "stability.last_loss": losses[-1]})
    report.add("2 stability fp16", "final loss scale (steps skipped)", f"{scale:g} ({skipped})", scale > 0,
               **{"stability.final_scale": scale, "stability.skipped_steps": skipped})
    try:
        ray_step(with_overrides(cfg, {"scaling.amp": "fp16", **DIVERGING}), data, 2, "diverge",
                 str(Path(cfg.flow.storage)))
        stopped, what = False, "trained on: no NonFiniteLossError"
    except NonFiniteLossError as exc:
        stopped, what = True, str(exc).split(": ", 1)[-1].split(";")[0]
    report.add("2 stability fp16", "divergence guard (lr 2000, wd 0.01)", what, stopped,
               **{"stability.guard_stopped": stopped, "stability.guard_message": what})


def check_sharded_head(cfg: Config, data: Datasets, sizes: Sizes, device: torch.device, report: Report) -> None:
    """(3): the same step with a full head and a sharded, sampled one over head_classes identities."""
    variants = {"full": {"model.head": "full", "model.head_sample_rate": 1.0},
                "sharded r=0.1": {"model.head": "sharded", "model.head_sample_rate": 0.1}}
    for name, overrides in variants.items():
        history, _ = ray_step(with_overrides(cfg, overrides), data, sizes.head_epochs,
                              f"head-{overrides['model.head']}", str(Path(cfg.flow.storage)),
                              num_classes=sizes.head_classes)
        step_ms = 1000 * cfg.step1.batch_size / best([m["images_per_s"] for m in history])
        memory = max((m["gpu_peak_memory_gib"] for m in history if "gpu_peak_memory_gib" in m), default=None)
        key = name.split()[0]
        report.add(f"3 head, {sizes.head_classes:,} ids", f"{name}: step time, peak GPU memory",
                   f"{step_ms:.1f} ms, " + ("n/a (CPU)" if memory is None else f"{memory:.2f} GiB"),
                   **{f"head.{key}.step_ms": step_ms, f"head.{key}.peak_gib": memory})


def check_data_pipeline(cfg: Config, data: Datasets, sizes: Sizes, consumed: float, report: Report) -> None:
    """(4): Ray Data alone (every CPU, no training worker), against what the GPU took in (1)."""
    rate = best(time_ray(data.train, cfg.data.image_size, cfg.data.augment, cfg.step1.batch_size, sizes.epochs))
    bound = "the data pipeline" if rate < 1.1 * consumed else "the device (the pipeline has room)"
    report.add("4 data pipeline", f"Ray Data decode + augment, {os.cpu_count()} CPUs", f"{rate:,.0f} img/s",
               **{"pipeline.images_per_s": rate})
    report.add("4 data pipeline", "consumed by the bf16 job (1) -> bottleneck", f"{consumed:,.0f} img/s -> {bound}",
               **{"pipeline.consumed_images_per_s": consumed, "pipeline.bottleneck": bound})


def check_onnx(cfg: Config, checkpoint, device: torch.device, work: Path, report: Report) -> None:
    """(5): export the trained net from the device; onnxruntime against the device's float32 outputs."""
    import onnxruntime as ort  # a test extra (pyproject), installed by gpu_check.sh

    net = checkpoints.load_net(checkpoint).to(device)
    size = cfg.data.image_size
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            want = dict(zip(OUTPUTS, (t.float().cpu().numpy() for t in net(images.to(device))), strict=True))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    started = time.perf_counter()
    paths = export_onnx(net, work / "eqface.onnx", size)
    export_s = time.perf_counter() - started
    session = ort.InferenceSession(str(paths[OUTPUTS]), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"images": images.numpy()}), strict=True))
    # Relative to the output's magnitude (floor 1): a trained net's embeddings are not unit vectors.
    diff = max(float(np.abs(got[n] - want[n]).max() / max(1.0, np.abs(want[n]).max())) for n in OUTPUTS)
    report.add("5 ONNX", f"export from {device.type} ({export_s:.1f} s), onnxruntime max abs diff / max abs output",
               f"{diff:.2e}", diff <= ONNX_TOLERANCE, **{"onnx.max_rel_diff": diff, "onnx.export_s": export_s})


def start_ray(device: torch.device) -> None:
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count() if device.type == "cuda"
             else 0, include_dashboard=False, log_to_driver=False)


def run(sizes: Sizes, work: Path, device: torch.device, report: Report) -> None:
    """The checks in order, each adding its rows to `report` as it ends."""
    cfg = base_config(sizes, work)
    shutil.rmtree(cfg.flow.storage, ignore_errors=True)  # a step run name found there would resume, not train
    deadline = time.monotonic() + sizes.budget_s
    data = None
    with check(report, "dataset", "0 synthetic shards", sizes, deadline, device):
        started = time.perf_counter()
        data = prepare_datasets(cfg)  # generated on first use, cached in work/datasets
        report.add("0 synthetic shards", f"{data.num_train:,} images, {data.num_classes:,} identities",
                   f"{time.perf_counter() - started:.0f} s")
    if data is None:
        return  # nothing to train on: the error row says why
    jobs: dict = {}
    try:
        with check(report, "throughput", "1 throughput", sizes, deadline, device):
            check_throughput(cfg, data, sizes, device, report, jobs)
        with check(report, "stability", "2 stability fp16", sizes, deadline, device):
            check_stability(cfg, data, needs(jobs, "fp16")[0], report)
        with check(report, "head", f"3 head, {sizes.head_classes:,} ids", sizes, deadline, device):
            check_sharded_head(cfg, data, sizes, device, report)
        with check(report, "pipeline", "4 data pipeline", sizes, deadline, device):
            needs(jobs, "bf16")
            check_data_pipeline(cfg, data, sizes, report.figures["throughput.bf16.ray_images_per_s"], report)
        with check(report, "onnx", "5 ONNX", sizes, deadline, device):
            check_onnx(cfg, needs(jobs, "bf16")[1], device, work, report)
    finally:
        ray.shutdown()


def needs(jobs: dict, amp: str):
    if amp not in jobs:
        raise RuntimeError(f"not run: the {amp} job of check 1 failed")
    return jobs[amp]


@contextmanager
def check(report: Report, name: str, section: str, sizes: Sizes, deadline: float, device: torch.device):
    """One check under its time cap (`sizes.caps[name]`, at most what is left of the run's budget): its wall
    seconds as figure time.<name>_s (where the run's minutes go); an error or the cap becomes a FAIL row, in one
    line, and the next check runs on a fresh Ray: a GPU's minutes are too scarce to lose the rest to one."""
    cap = min(sizes.caps[name], deadline - time.monotonic())
    started = time.perf_counter()

    def over_cap(signum, frame):
        raise CheckTimeout(f"over its {cap:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, over_cap)
    try:
        if cap <= 0:
            raise CheckTimeout("not started: the run's time budget is spent")
        signal.setitimer(signal.ITIMER_REAL, cap)
        yield
    except Exception as exc:  # noqa: BLE001 - reported in the table and the exit status
        signal.setitimer(signal.ITIMER_REAL, 0)
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        report.add(section, "error", f"{type(exc).__name__}: {message}", False)
        if name != "dataset":
            ray.shutdown()  # whatever the check left running (a Train controller, a hung job) goes with it
            start_ray(device)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        report.figures[f"time.{name}_s"] = time.perf_counter() - started
        report.flush()


def describe(cfg: Config, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
            f"{cfg.model.backbone} x{cfg.model.width_mult} @ {cfg.data.image_size}px, batch {cfg.step1.batch_size}, "
            f"{cfg.data.synthetic.num_identities * cfg.data.synthetic.train_per_identity} images/epoch")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (CI)")
    parser.add_argument("--work", type=Path, help="datasets and checkpoints (default: a temporary directory)")
    parser.add_argument("--results", type=Path, help="table.md, figures.json, imports.txt go here, as they come")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--budget-s", type=float, help="the whole run's time budget (default: the sizes')")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(f"gpu_check: error: torch {torch.__version__} sees no CUDA device; --smoke runs on the CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    sizes = SMOKE if args.smoke else GPU
    if args.budget_s:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eqface-gpu-check-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        report = Report(header=describe(base_config(sizes, work), device), results=args.results)
        try:
            run(sizes, work, device, report)
        finally:
            report.figures.update({"device": device.type, "smoke": args.smoke,
                                   "total_s": time.perf_counter() - started})
            report.flush()
            if args.results:
                write_imports(args.results / "imports.txt")
    print(f"\n{report.header}; {report.figures['total_s']:.0f} s in all\n")
    print(report.table())
    if args.json:
        args.json.write_text(report.as_json())
    if report.failed:
        print("gpu_check: FAILED: " + "; ".join(report.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
