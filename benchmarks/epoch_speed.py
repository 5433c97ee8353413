"""Seconds per training epoch on real MNIST, and of the evaluation's bound, measured in one run:

(a) the reference notebook's loop as written there (torchvision DataLoader + ToTensor + flatten, Adam);
(b) the project's training path: the objects ``python -m vae_lightning.train`` builds from the
    default config (Lightning Trainer, every default callback and logger, per-step logging),
    validation on the 10k test set included in each epoch;
(b') the same with ``data.binarize=dynamic``: what drawing every training batch anew costs;
(h) the same with ``logger=many``: TensorBoard, CSV and MLflow (its SQLite store): what a second
    and third tracker cost, MLflow's per-step metrics included;
(d) a bare PyTorch loop over the same preloaded tensor with fused Adam (no Lightning): what
    Lightning, logging and validation add on top of the compute;
(g) Lightning's own floor: (d)'s step as the whole LightningModule, fed by the project's loader,
    with no callback, logger, metric, progress bar, checkpoint or validation: what one Lightning
    step per optimizer step costs before the project adds anything;
(c) the GEMM floor: the matrix-multiply FLOPs of one epoch at the FLOP/s this machine sustains
    at the model's shapes;
(e) the importance-weighted bound (k = 5000) over 1,000 test images, as the evaluation runs it;
(f) its GEMM floor: its matrix-multiply FLOPs at the rate measured at its own shapes.

Candidates are interleaved round by round and medians are reported, since timings on a shared
machine drift; the ratios are medians of each round's own ratio, so a slow round slows both sides.
Usage: ``make bench`` or ``python benchmarks/epoch_speed.py --rounds 3 --epochs 2``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vae_lightning.data.datamodule import tensor_loader
from vae_lightning.data.datasets import default_data_dir, ensure_dataset, load_split
from vae_lightning.errors import DataError
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.objectives import elbo_terms
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import build_run
from vae_lightning.workarounds import skip_nvml_probe_without_gpu

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads the work and not its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict[str, object]:
    """What the timings depend on: results from different machines are not comparable."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in wanted if flag in flags],
        "threads": torch.get_num_threads(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
    }


def interleaved(candidates: dict, run, rounds: int) -> tuple[dict, dict[str, list[float]]]:
    """``run(*candidate)`` for every candidate, once to warm up (its result kept), then ``rounds``
    rounds of all of them in turn, so that all see the same machine load: (results, seconds)."""
    results = {name: run(*candidate) for name, candidate in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, candidate in candidates.items():
            start = time.perf_counter()
            run(*candidate)
            times[name].append(time.perf_counter() - start)
    return results, times


def reference_loop_epochs(data_dir: Path, epochs: int, device: torch.device) -> list[float]:
    """The reference notebook's cells, unchanged but for timing (its VAE is ours: same layers and init)."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(lambda x: x.view(-1))])
    train_dataset = datasets.MNIST(root=str(data_dir), train=True, transform=transform, download=False)
    train_loader = DataLoader(train_dataset, batch_size=128, shuffle=True)
    vae = VAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def loss_function(recon_x, x, mu, logvar):
        bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kld, bce, kld

    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        vae.train()
        train_loss = reconstruction_loss = kl_loss = 0.0
        for data, _ in train_loader:
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = vae(data)
            loss, bce, kld = loss_function(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            reconstruction_loss += bce.item()
            kl_loss += kld.item()
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def bare_loss(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """The loss every bare step here backpropagates: (d), (g) and the other benchmarks' bare steps."""
    bce, kl = elbo_terms(model, images)
    return bce.sum() + kl.sum()


def bare_loop_epochs(data_dir: Path, epochs: int, device: torch.device) -> list[float]:
    images = load_split(data_dir, train=True)[0].to(device)
    vae = VAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
    times = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        for i in range(0, len(images), 128):
            loss = bare_loss(vae, images[order[i : i + 128]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class BareStepModule(L.LightningModule):
    """(g): the bare loop's step and nothing else, as Lightning runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = VAE()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return bare_loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def lightning_floor_epochs(data_dir: Path, epochs: int, device: torch.device) -> list[float]:
    images = load_split(data_dir, train=True)[0].to(device)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(BareStepModule(), train_dataloaders=tensor_loader(images, 128, True, 0, 0, 1))
    return timer.times


def per_round_ratio(top: list[float], bottom: list[float], rounds: int) -> float:
    """Median over rounds of (this round's median of ``top``) / (its median of ``bottom``)."""
    per = len(top) // rounds
    return statistics.median(
        statistics.median(top[r * per : (r + 1) * per]) / statistics.median(bottom[r * per : (r + 1) * per])
        for r in range(rounds)
    )


class EpochTimer(L.Callback):
    """Wall time from one training epoch's start to its end, validation included, and the
    validation pass's own share."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.val_times: list[float] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            sync(pl_module.device)
            self.val_times.append(time.perf_counter() - self._val_start)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def project_epochs(data_dir: Path, epochs: int, overrides: list[str]) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            # paths.log_dir: logger=mlflow's SQLite store, in the temporary dir too
            overrides=[f"paths.output_dir={out}", f"paths.log_dir={out}", f"data.data_dir={data_dir}"]
            + [f"trainer.max_epochs={epochs}", *overrides],
        )
        OmegaConf.resolve(cfg)
        timer = EpochTimer()
        datamodule, module, trainer = build_run(cfg, extra_callbacks=[timer])
        trainer.fit(module, datamodule=datamodule)
    return timer.times, timer.val_times


def gemm_floor(device: torch.device, batch: int = 128, repeats: int = 30) -> dict[str, float]:
    """FLOP/s of the GEMMs of one training step (forward and backward, bias-free) at the
    model's shapes, and the seconds an epoch's GEMMs would take at that rate."""
    dims = [(784, 400), (400, 40), (20, 400), (400, 784)]  # fc_mu and fc_logvar as one 400x40
    weights = [torch.randn(o, i, device=device) for i, o in dims]
    acts = [torch.randn(batch, i, device=device) for i, _ in dims]
    outs = [torch.randn(batch, o, device=device) for _, o in dims]
    flops = 0
    for k, (i, o) in enumerate(dims):
        flops += 2 * batch * i * o * (3 if k else 2)  # forward, weight grad, input grad (not for x)

    def step() -> None:
        for k, (w, a, g) in enumerate(zip(weights, acts, outs, strict=True)):
            torch.mm(a, w.t())
            torch.mm(g.t(), a)
            if k:
                torch.mm(g, w)

    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    rate = flops * repeats / (time.perf_counter() - start)
    epoch_flops = flops * 60000 / batch
    return {"gflop_per_s": rate / 1e9, "gflop_per_epoch": epoch_flops / 1e9, "s_per_epoch": epoch_flops / rate}


def bound_seconds(data_dir: Path, device: torch.device, images: int, k: int) -> float:
    """(e) Seconds of the importance-weighted bound, as the evaluation computes it (its batch size
    and chunking), over the first ``images`` test images with ``k`` samples each."""
    test_x = load_split(data_dir, train=False)[0][:images].to(device)
    vae = VAE().to(device).eval()  # the cost does not depend on the weights
    gen = torch.Generator(device=device).manual_seed(0)
    batch, chunk_rows = 100, 32768  # conf/eval/default.yaml
    sync(device)
    start = time.perf_counter()
    for xb in test_x.split(batch):
        iw_log_likelihood(vae, xb, k, chunk_rows, gen)
    sync(device)
    return time.perf_counter() - start


def bound_floor(device: torch.device, images: int, k: int, repeats: int = 5) -> dict[str, float]:
    """(f) The bound's matrix-multiply FLOPs (fc3 and fc4 on every sample, its only GEMMs of any
    size) at the rate this machine sustains at the bound's own shapes."""
    batch, chunk_rows, latent, hidden, pixels = 100, 32768, 20, 400, 784
    rows = (chunk_rows // batch) * batch
    z, w3 = torch.randn(rows, latent, device=device), torch.randn(hidden, latent, device=device)
    h, w4 = torch.randn(rows, hidden, device=device), torch.randn(pixels, hidden, device=device)
    torch.mm(z, w3.t()), torch.mm(h, w4.t())
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(z, w3.t())
        torch.mm(h, w4.t())
    sync(device)
    rate = 2 * rows * hidden * (latent + pixels) * repeats / (time.perf_counter() - start)
    flops = 2 * images * k * hidden * (latent + pixels)
    return {"gflop_per_s": rate / 1e9, "gflop": flops / 1e9, "seconds": flops / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all candidates")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per candidate per round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "epoch_speed.json")
    parser.add_argument("--eval-images", type=int, default=1000, help="test images for (e) and (f)")
    parser.add_argument("--eval-k", type=int, default=5000, help="importance samples per image for (e) and (f)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("overrides", nargs="*", help="config overrides for the project's path (b)")
    args = parser.parse_args()
    device = torch.device(args.device)
    # every candidate on the same device: (b) with the trainer on it
    overrides = [f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", *args.overrides]

    data_dir = default_data_dir()
    try:
        ensure_dataset(data_dir, download=True)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    skip_nvml_probe_without_gpu()  # as build_run does for (b): no candidate pays torch's per-step NVML probe
    reference, project, val, bare, lightning, floor, bound, bound_floors, dynamic = ([] for _ in range(9))
    many = []
    for r in range(args.rounds):
        # (b), (d) and (g) side by side: their ratios are taken round by round
        epoch_times, val_times = project_epochs(data_dir, args.epochs, overrides)
        project += epoch_times
        val += val_times
        bare += bare_loop_epochs(data_dir, args.epochs, device)
        lightning += lightning_floor_epochs(data_dir, args.epochs, device)
        dynamic += project_epochs(data_dir, args.epochs, [*overrides, "data.binarize=dynamic"])[0]
        many += project_epochs(data_dir, args.epochs, [*overrides, "logger=many"])[0]
        reference += reference_loop_epochs(data_dir, args.epochs, device)
        floor.append(gemm_floor(device))
        bound.append(bound_seconds(data_dir, device, args.eval_images, args.eval_k))
        bound_floors.append(bound_floor(device, args.eval_images, args.eval_k))
        print(
            f"round {r + 1}/{args.rounds}: project {project[-1]:.2f} s, bare {bare[-1]:.2f} s, "
            f"Lightning's floor {lightning[-1]:.2f} s, dynamic binarization {dynamic[-1]:.2f} s, "
            f"logger=many {many[-1]:.2f} s, "
            f"reference notebook {reference[-1]:.2f} s, bound {bound[-1]:.1f} s",
            flush=True,
        )

    b = statistics.median(project)
    c = statistics.median(f["s_per_epoch"] for f in floor)
    rate = statistics.median(f["gflop_per_s"] for f in floor)
    f = statistics.median(g["seconds"] for g in bound_floors)
    bound_rate = statistics.median(g["gflop_per_s"] for g in bound_floors)
    ratio = {
        "reference_over_project": per_round_ratio(reference, project, args.rounds),
        "project_over_floor": b / c,
        "project_over_bare": per_round_ratio(project, bare, args.rounds),
        "lightning_floor_over_bare": per_round_ratio(lightning, bare, args.rounds),
        "project_over_lightning_floor": per_round_ratio(project, lightning, args.rounds),
        "dynamic_over_project": per_round_ratio(dynamic, project, args.rounds),
        "many_loggers_over_project": per_round_ratio(many, project, args.rounds),
        "bound_over_floor": per_round_ratio(bound, [g["seconds"] for g in bound_floors], args.rounds),
    }

    def spread(times: list[float]) -> dict[str, float]:
        return {"median": statistics.median(times), "min": min(times), "max": max(times)}

    result = {
        "machine": machine(device),
        "rounds": args.rounds,
        "epochs_per_round": args.epochs,
        "overrides": overrides,
        "reference_loop_s_per_epoch": spread(reference),
        "project_s_per_epoch": spread(project),
        "validation_s_per_epoch": statistics.median(val),
        "dynamic_binarization_s_per_epoch": spread(dynamic),
        "many_loggers_s_per_epoch": spread(many),
        "bare_loop_s_per_epoch": spread(bare),
        "lightning_floor_s_per_epoch": spread(lightning),
        "gemm_floor_s_per_epoch": c,
        "gemm_gflop_per_s": rate,
        "gflop_per_epoch": floor[0]["gflop_per_epoch"],
        "ratios_median_of_rounds": ratio,
        "bound": {"images": args.eval_images, "k": args.eval_k, "gflop": bound_floors[0]["gflop"]},
        "bound_s": spread(bound),
        "bound_gemm_floor_s": f,
        "bound_gemm_gflop_per_s": bound_rate,
    }

    def row(what: str, times: list[float], digits: int = 2) -> str:
        low, high = min(times), max(times)
        return f"| {what} | {statistics.median(times):.{digits}f} | {low:.{digits}f}-{high:.{digits}f} |"

    print(f"\nmachine: {result['machine']}\n")
    print("| candidate | s/epoch (median) | min-max |")
    print("|---|---|---|")
    print(row("(a) reference notebook loop", reference))
    print(row("(b) vae_lightning.train path", project))
    print(f"| of which validation on the 10k test images | {statistics.median(val):.2f} | |")
    print(row("(b') the same, data.binarize=dynamic", dynamic))
    print(row("(h) the same, logger=many (TensorBoard, CSV, MLflow)", many))
    print(row("(d) bare loop, preloaded tensor, fused Adam", bare))
    print(row("(g) Lightning's floor: (d)'s step as a LightningModule, nothing else", lightning))
    print(f"| (c) GEMM floor ({result['gflop_per_epoch']:.0f} GFLOP at {rate:.0f} GFLOP/s) | {c:.2f} | |")
    print(row(f"(e) bound, k = {args.eval_k}, {args.eval_images} test images (seconds)", bound, 1))
    gflop = bound_floors[0]["gflop"]
    print(f"| (f) its GEMM floor ({gflop:.0f} GFLOP at {bound_rate:.0f} GFLOP/s) | {f:.1f} | |")
    print(
        f"\nmedians of the rounds' ratios: (a)/(b) = {ratio['reference_over_project']:.2f}x   "
        f"(b)/(d) = {ratio['project_over_bare']:.3f}x   (g)/(d) = {ratio['lightning_floor_over_bare']:.3f}x   "
        f"(b)/(g) = {ratio['project_over_lightning_floor']:.3f}x   (b')/(b) = {ratio['dynamic_over_project']:.3f}x   "
        f"(h)/(b) = {ratio['many_loggers_over_project']:.3f}x   "
        f"(e)/(f) = {ratio['bound_over_floor']:.2f}x;   (b)/(c) = {b / c:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
