"""The field's protocols and objectives: binarized data, Fashion-MNIST, IWAE, beta and KL warm-up,
seed aggregation, and evaluation under the checkpoint's protocol."""

import csv
import json
import shutil
import statistics
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import brief_run, run_cli

from vae_lightning.data.datamodule import MNISTDataModule, binarize
from vae_lightning.data.datasets import FASHION_MNIST_FILES, ensure_dataset
from vae_lightning.errors import DataError
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.objectives import elbo_terms, iwae_terms, log_importance_weights
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import load_trained, module_from_checkpoint
from vae_lightning.runs.sweep import summarise
from vae_lightning.training.checkpoints import find_checkpoint
from vae_lightning.training.module import VAEModule


def _datamodule(mnist_dir, binarize: str, seed: int = 0, val_split: int = 0) -> MNISTDataModule:
    dm = MNISTDataModule(str(mnist_dir), binarize=binarize, seed=seed, download=False, val_split=val_split)
    dm.checked = True  # the sizes were checked by the mnist_dir fixture
    dm.setup("fit")
    return dm


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_binarize_draws_bernoulli_pixels():
    p = torch.tensor([0.0, 1 / 255, 0.25, 0.5, 254 / 255, 1.0]).repeat(200_000, 1)
    x = binarize(p, torch.Generator().manual_seed(0))
    assert _is_binary(x) and x.dtype == torch.float32
    assert x[:, 0].sum() == 0 and x[:, -1].sum() == len(x)  # p = 0 and p = 1 exactly
    # the frequency of ones is p within 5 standard errors
    stderr = (p[0] * (1 - p[0]) / len(x)).sqrt()
    assert ((x.mean(0) - p[0]).abs() <= 5 * stderr + 1e-9).all(), x.mean(0)
    assert torch.equal(
        binarize(p[:10], torch.Generator().manual_seed(1)), binarize(p[:10], torch.Generator().manual_seed(1))
    )


def test_binarize_is_the_16_bit_rule_exactly_for_every_mnist_intensity():
    # every value ToTensor gives, 2,000 draws each, and p = 0 a million times, where u = -32768 (1 in
    # 65,536) must give 0: the rule's one tie
    p = torch.cat([(torch.arange(256) / 255).repeat(2_000), torch.zeros(2**20)]).view(-1, 256)
    words = torch.randint(
        -(2**63), 2**63 - 1, (p.numel() // 4,), dtype=torch.int64, generator=torch.Generator().manual_seed(3)
    )
    uniform = words.view(torch.int16).view(p.shape).float()
    assert (uniform == -32768).any()
    rule = (uniform < p * 65536 - 32768).float()  # the documented rule, P(x = 1) = p to 2^-16
    assert torch.equal(binarize(p, torch.Generator().manual_seed(3)), rule)


def test_dynamic_binarization_redraws_training_batches_and_static_does_not(mnist_dir):
    dynamic, static = _datamodule(mnist_dir, "dynamic"), _datamodule(mnist_dir, "static")
    training = SimpleNamespace(training=True)
    dynamic.trainer = static.trainer = training
    batch = dynamic.train_x[:128]
    first, second = dynamic.on_after_batch_transfer(batch, 0), dynamic.on_after_batch_transfer(batch, 0)
    assert _is_binary(first) and _is_binary(second) and not torch.equal(first, second)
    # a pixel is 1 as often as it is bright: the images stay the digits
    assert abs(first.mean().item() - batch.mean().item()) < 0.01
    # static: the training set is one fixed draw, the same in a second run, used as it is
    assert _is_binary(static.train_x) and torch.equal(static.train_x, _datamodule(mnist_dir, "static", seed=5).train_x)
    assert torch.equal(static.on_after_batch_transfer(static.train_x[:128], 0), static.train_x[:128])
    assert abs(static.train_x.mean().item() - dynamic.train_x.mean().item()) < 0.001
    # outside training (validation, test) nothing is redrawn
    dynamic.trainer = SimpleNamespace(training=False)
    assert torch.equal(dynamic.on_after_batch_transfer(dynamic.test_x[:10], 0), dynamic.test_x[:10])


def test_val_split_holds_out_the_last_training_images_for_validation_only(mnist_dir):
    plain, split = _datamodule(mnist_dir, "none"), _datamodule(mnist_dir, "none", val_split=10_000)
    assert (len(split.train_x), len(split.val_x), len(split.test_x)) == (50_000, 10_000, 10_000)
    assert torch.equal(split.train_x, plain.train_x[:50_000]) and torch.equal(split.val_x, plain.train_x[50_000:])
    assert torch.equal(next(iter(split.val_dataloader())), split.val_x[:1000])  # validation: the held-out images
    assert torch.equal(next(iter(split.test_dataloader())), plain.test_x[:1000])  # the test: the test set still
    assert torch.equal(next(iter(plain.val_dataloader())), plain.test_x[:1000])  # 0: the test set, as before
    assert split.protocol()["val_split"] == 10_000 and "val_split" not in plain.protocol()
    # binarized: the held-out images are their part of the training set's one draw, in both modes
    static, dynamic = (_datamodule(mnist_dir, mode, val_split=10_000) for mode in ("static", "dynamic"))
    whole_draw = _datamodule(mnist_dir, "static").train_x
    assert torch.equal(static.val_x, whole_draw[50_000:]) and torch.equal(dynamic.val_x, static.val_x)
    assert torch.equal(static.train_x, whole_draw[:50_000]) and torch.equal(dynamic.train_x, split.train_x)
    with pytest.raises(DataError, match="val_split=60000 would leave nothing to train on.*hold out fewer"):
        _datamodule(mnist_dir, "none", val_split=60_000)
    with pytest.raises(DataError, match="val_split=-1"):
        MNISTDataModule(str(mnist_dir), val_split=-1)


@pytest.mark.slow
def test_a_run_with_val_split_records_it_in_its_metrics_and_checkpoint(mnist_dir, tmp_path):
    metrics = brief_run(tmp_path / "run", mnist_dir, "data.val_split=10000")
    assert metrics["val_split"] == 10_000 and {"val/loss", "test/loss", "test/iw_nll"} <= set(metrics)
    assert load_trained(metrics["checkpoint"])[1]["val_split"] == 10_000


def test_the_binarized_test_set_is_one_fixed_draw_for_every_run_and_protocol(mnist_dir):
    runs = [_datamodule(mnist_dir, "dynamic", seed=0), _datamodule(mnist_dir, "dynamic", seed=1)]
    runs.append(_datamodule(mnist_dir, "static", seed=2))
    assert _is_binary(runs[0].test_x)
    assert all(torch.equal(runs[0].test_x, dm.test_x) for dm in runs[1:])
    continuous = _datamodule(mnist_dir, "none")
    assert not _is_binary(continuous.test_x) and torch.equal(continuous.train_x, runs[0].train_x)


def _trained_vae(run_dir) -> VAE:
    return module_from_checkpoint(find_checkpoint(run_dir, "best")).model.eval()


def test_iwae_with_one_sample_trains_exactly_as_the_elbo(mnist_dir):
    images = _datamodule(mnist_dir, "none").train_x[:640]
    weights = []
    for objective in ("elbo", "iwae"):
        torch.manual_seed(0)
        module = VAEModule(objective=objective, k=1)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(images, batch_size=128))
        weights.append(module.state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_log_importance_weights_average_to_the_elbo(mnist_dir):
    torch.manual_seed(0)
    model, x = VAE(), _datamodule(mnist_dir, "dynamic").test_x[:20]
    with torch.no_grad():
        log_w, bce, _, mu, logvar = log_importance_weights(model, x, 4000, torch.Generator().manual_seed(0))
        elbo_bce, kl = elbo_terms(model, x, torch.Generator().manual_seed(1))
    # E[-log w] = BCE + KL, here with KL in closed form and the BCE from the same draws
    assert torch.allclose(-log_w.mean(0), bce.mean(0) + kl, atol=0.3), -log_w.mean(0) - bce.mean(0) - kl
    assert torch.allclose(bce.mean(0), elbo_bce, rtol=0.02)


@pytest.mark.slow
def test_the_iwae_bound_tightens_with_k_and_matches_the_evaluation(trained_run, mnist_dir):
    model, x = _trained_vae(trained_run[0]), _datamodule(mnist_dir, "none").test_x[:1000]
    with torch.no_grad():
        bounds = {k: iwae_terms(model, x, k, torch.Generator().manual_seed(k))[2].mean().item() for k in (1, 5, 50)}
    assert bounds[1] > bounds[5] + 0.5 > bounds[50] + 1.0, bounds
    evaluated = -iw_log_likelihood(model, x, 50, generator=torch.Generator().manual_seed(7)).mean().item()
    assert evaluated == pytest.approx(bounds[50], abs=0.1)  # the evaluation's estimator of the same bound


class KLWeights(L.Callback):
    def __init__(self) -> None:
        self.weights: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights.append((trainer.global_step, pl_module.objective.kl_weight(pl_module.progress())))


def test_kl_warm_up_follows_its_linear_schedule_to_beta(mnist_dir, tmp_path):
    dm = MNISTDataModule(str(mnist_dir), download=False)
    dm.checked = True
    module, record = VAEModule(beta=0.5, kl_warmup_epochs=2), KLWeights()
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=10, limit_val_batches=1, callbacks=[record], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert [step for step, _ in record.weights] == list(range(30))
    assert [w for _, w in record.weights] == pytest.approx([0.5 * min(1.0, step / 20) for step in range(30)])
    assert trainer.callback_metrics["train/loss"] == pytest.approx(
        float(trainer.callback_metrics["train/rec"] + trainer.callback_metrics["train/kl"]), rel=1e-5
    )  # the logged loss is the ELBO itself, whatever the weight


@pytest.mark.slow  # three CLI runs
@pytest.mark.parametrize("setting", ["model.objective=iwae model.beta=2", "model.objective=nope", "model.k=0"])
def test_impossible_objective_settings_are_one_line(tmp_path, setting):
    result = run_cli("vae_lightning.train", *setting.split(), f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr


@pytest.fixture(scope="module")
def fashion_dir(mnist_dir):
    """Fashion-MNIST beside MNIST ($VAE_DATA_DIR/FashionMNIST/raw), as in ../shared/data."""
    try:
        ensure_dataset(mnist_dir, "fashion_mnist", download=True, verify_checksums=False)
    except DataError as err:
        pytest.skip(f"Fashion-MNIST unavailable: {err}")
    return mnist_dir


@pytest.mark.slow
def test_fashion_mnist_trains_end_to_end_with_its_class_names(fashion_dir, tmp_path):
    metrics = brief_run(tmp_path, fashion_dir, "data=fashion_mnist", "model.latent_dim=5")
    assert metrics["dataset"] == "fashion_mnist" and metrics["binarize"] == "none"
    assert metrics["test/loss"] > 200  # clothes are not digits: MNIST's loss after 30 steps is ~170
    projector = next((tmp_path / "tensorboard").glob("**/metadata.tsv")).read_text().splitlines()
    assert {"T-shirt/top", "Ankle boot"} <= set(projector) and "0" not in projector
    assert '"T-shirt/top"' in (tmp_path / "report.html").read_text()
    # continued as the README says (ckpt_path=<run>, longer), naming neither dataset nor model: the
    # run's own, Fashion-MNIST and 5 latents, not today's defaults
    common = ["trainer.max_epochs=2", "+trainer.limit_train_batches=30", "eval.k=2", f"data.data_dir={fashion_dir}"]
    continued = run_cli("vae_lightning.train", f"ckpt_path={tmp_path}", *common)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "with its own model.latent_dim=5, data.dataset=fashion_mnist" in continued.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dataset"] == "fashion_mnist" and metrics["epochs"] == 2 and metrics["val/loss"] > 200
    assert metrics["latent_dim"] == 5
    with (tmp_path / "epochs.csv").open() as f:
        assert [float(r["val/loss"]) > 200 for r in csv.DictReader(f)] == [True, True]
    # another dataset named for the continuation is refused: it would change what the run means
    before = (tmp_path / "metrics.json").read_bytes()
    refused = run_cli("vae_lightning.train", f"ckpt_path={tmp_path}", "data=mnist", *common[1:], "trainer.max_epochs=3")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path}/checkpoints/last.ckpt was trained with data.dataset=fashion_mnist, and a continued run "
        "keeps its data: drop what sets data.dataset=mnist, or start a new run without ckpt_path"
    ]
    assert (tmp_path / "metrics.json").read_bytes() == before


def _fashion_copy(src, dst):
    raw = dst / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        shutil.copy(src / "FashionMNIST" / "raw" / name, raw / name)
    return raw


@pytest.mark.slow  # copies and checksums Fashion-MNIST
def test_fashion_mnist_offline_and_bad_files_are_one_line(fashion_dir, tmp_path):
    def error(data_dir):
        result = run_cli("vae_lightning.train", "data=fashion_mnist", "data.download=false",
                         f"data.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stderr.strip().splitlines()[-1]

    assert error(tmp_path / "empty").startswith("error: Fashion-MNIST not found: train-images-idx3-ubyte")
    raw = _fashion_copy(fashion_dir, tmp_path / "copy")
    with (raw / "train-labels-idx1-ubyte").open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    line = error(tmp_path / "copy")
    assert "Fashion-MNIST file" in line and "train-labels-idx1-ubyte is corrupt (md5 mismatch)" in line
    assert "FashionMNIST/raw/" in line


@pytest.mark.slow
def test_eval_of_a_binarized_checkpoint_uses_the_binarized_test_set(mnist_dir, tmp_path):
    trained = brief_run(tmp_path / "run", mnist_dir, "data.binarize=static", "model.objective=iwae", "model.k=3")
    assert trained["binarize"] == "static" and trained["binarize_seed"] == 0
    # evaluated with today's defaults (continuous MNIST): the checkpoint's protocol wins
    result = run_cli("vae_lightning.eval", f"ckpt_path={tmp_path / 'run'}", "eval.k=2", f"data.data_dir={mnist_dir}",
                     f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (evaluated["dataset"], evaluated["binarize"], evaluated["binarize_seed"]) == ("mnist", "static", 0)
    # the same test images, objective and noise give the same test numbers as the training run's
    for key in ("test/loss", "test/rec", "test/kl", "test/iw_nll"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-4), key
    assert "binarized test set" in evaluated["note"]
    assert "on the data it was trained on (dataset=mnist, binarize=static, binarize_seed=0)" in result.stdout


DONE = {"wall_seconds": 10.0}  # written last: the job went to its end


def _fake_sweep(sweep_dir, jobs):
    for number, (overrides, metrics) in enumerate(jobs):
        job = sweep_dir / str(number)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_the_summary_gives_mean_and_std_over_seeds_per_setting(tmp_path):
    jobs = [
        (["model.k=1", "seed=0", "data.binarize=dynamic"], {"test/iw_nll": 90.0, "epochs": 2, **DONE}),
        (["model.k=1", "seed=1", "data.binarize=dynamic"], {"test/iw_nll": 92.0, "epochs": 2, **DONE}),
        (["model.k=5", "seed=0", "data.binarize=dynamic"], {"test/iw_nll": 88.0, "epochs": 2, **DONE}),
        (["model.k=5", "seed=1", "data.binarize=dynamic"], {"test/iw_nll": 89.0, "epochs": 2, **DONE}),
        (["model.k=5", "seed=2", "data.binarize=dynamic"], {"test/iw_nll": 90.0, "epochs": 2, **DONE}),
        (["model.k=5", "seed=3", "data.binarize=dynamic"], {"status": "failed: diverged"}),
    ]
    _fake_sweep(tmp_path, jobs)
    summarise(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| model.k=1 | 2 | " in text and "91.000 ± 1.414" in text
    assert "| model.k=5 | 3 | " in text and "89.000 ± 1.000" in text
    rows = (tmp_path / "summary_by_setting.csv").read_text().splitlines()
    assert rows[0].startswith("setting,n,seeds,") and rows[2].startswith("model.k=5,3,0 1 2,")


def test_a_job_stopped_in_its_test_pass_is_not_counted_and_no_mean_is_over_fewer_than_n(tmp_path):
    jobs = [
        (["model.k=1", "seed=0"], {"val/loss": 95.0, "test/iw_nll": 90.0, "epochs": 2, **DONE}),
        (["model.k=1", "seed=1"], {"val/loss": 97.0, "test/iw_nll": 92.0, "epochs": 2, **DONE}),
        (["model.k=1", "seed=2"], {"val/loss": 96.0, "epochs": 2}),  # killed in its test pass
        (["model.k=5", "seed=0"], {"val/loss": 94.0, "test/iw_nll": 88.0, "epochs": 2, **DONE}),
        (["model.k=5", "seed=1"], {"val/loss": 93.0, "epochs": 2, **DONE}),  # finished without the bound
    ]
    _fake_sweep(tmp_path, jobs)
    rows = summarise(tmp_path)
    assert rows[2]["status"] == "stopped before it finished (continue it with ckpt_path=last)"
    with (tmp_path / "summary_by_setting.csv").open() as f:
        by_setting = {row["setting"]: row for row in csv.DictReader(f)}
    assert by_setting["model.k=1"]["n"] == "2" and by_setting["model.k=1"]["seeds"] == "0 1"
    assert float(by_setting["model.k=1"]["test/iw_nll mean"]) == 91.0
    assert by_setting["model.k=5"]["n"] == "2" and float(by_setting["model.k=5"]["val/loss mean"]) == 93.5
    assert by_setting["model.k=5"]["test/iw_nll mean"] == ""  # one of the 2 has it: no mean


class SeenBatches(L.Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.clone())


def test_training_steps_see_the_dynamic_draws(mnist_dir):
    """Lightning hands the training step the datamodule's binarized batch; validation sees the fixed test draw."""
    dm = MNISTDataModule(str(mnist_dir), binarize="dynamic", download=False)
    dm.checked = True
    seen = SeenBatches()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[seen], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(VAEModule(), datamodule=dm)
    assert len(seen.batches) == 3 and all(_is_binary(batch) for batch in seen.batches)
    assert _is_binary(dm.test_x) and not _is_binary(dm.train_x)  # the stored training images stay grey


@pytest.mark.slow
def test_a_two_seed_two_setting_multirun_summarises_over_seeds(mnist_dir, tmp_path):
    result = run_cli(
        "vae_lightning.train", "-m", "seed=0,1", "model.objective=elbo,iwae", "model.k=2", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=20", "eval.k=0", "test=false", f"data.data_dir={mnist_dir}",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    by_setting = list(csv.DictReader((tmp_path / "summary_by_setting.csv").open()))
    assert [(row["setting"], row["n"], row["seeds"]) for row in by_setting] == [
        ("model.objective=elbo", "2", "0 1"),
        ("model.objective=iwae", "2", "0 1"),
    ]
    for row in by_setting:  # each setting's numbers are those of its two jobs
        values = [
            json.loads((job / "metrics.json").read_text())["val/loss"]
            for job in tmp_path.iterdir()
            if (job / ".hydra").is_dir() and row["setting"] in (job / ".hydra" / "overrides.yaml").read_text()
        ]
        assert len(values) == 2 and values[0] != values[1]
        assert float(row["val/loss mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["val/loss std"]) == pytest.approx(statistics.stdev(values))
    text = (tmp_path / "summary.md").read_text()
    assert "## Over seeds" in text and "| model.objective=iwae | 2 | " in text and " ± " in text


def test_a_sweep_over_seeds_alone_is_one_setting_named_by_what_its_jobs_share(tmp_path):
    jobs = [(["experiment=binarized_elbo", f"seed={s}"], {"test/iw_nll": 91.0 + s, **DONE}) for s in range(3)]
    _fake_sweep(tmp_path, jobs)
    summarise(tmp_path)
    assert "| experiment=binarized_elbo | 3 | " in (tmp_path / "summary.md").read_text()
    assert "92.000 ± 1.000" in (tmp_path / "summary.md").read_text()
