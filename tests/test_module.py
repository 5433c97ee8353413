import lightning as L
import pytest
import torch
from torchmetrics import MeanMetric

from vae_lightning.data.datamodule import tensor_loader
from vae_lightning.model.likelihoods import bce_from_logits
from vae_lightning.model.priors import kl_divergence
from vae_lightning.model.vae import VAE
from vae_lightning.training.module import PerImageMean, VAEModule


def _trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1,
    )  # fmt: skip


def test_epoch_values_are_sums_over_images_divided_by_images_seen(monkeypatch):
    """300 images in batches of 128, 128, 44: the epoch value must weight each batch by its
    size (the reference notebook's sum / len(dataset)), not average the three batch means."""
    torch.manual_seed(0)
    monkeypatch.setattr(VAE, "reparameterize", staticmethod(lambda mu, logvar, generator=None: mu))
    x = torch.rand(300, 784).round()
    x[:128] *= 0.1  # make batch means differ, so an unweighted mean would be visibly off
    module = VAEModule.from_settings({"hidden": [32]}, latent_dim=4)
    loader = tensor_loader(x, 128, False, 0, 0, 1)
    result = _trainer().validate(module, dataloaders=loader, verbose=False)[0]
    with torch.no_grad():
        mu, logvar = module.model.encode(x)
        bce = bce_from_logits(module.model.decode_logits(mu), x).sum() / 300
        kl = kl_divergence(mu, logvar).sum() / 300
    assert result["val/rec"] == pytest.approx(bce.item(), rel=1e-5)
    assert result["val/kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert result["val/loss"] == pytest.approx((bce + kl).item(), rel=1e-5)


def test_per_image_mean_gives_torchmetrics_mean_to_the_bit():
    ours, library = PerImageMean(), MeanMetric()
    torch.manual_seed(0)
    for size in (128, 128, 44):
        values = torch.randn(size) * 50 + 100
        ours.update(values)
        library.update(values)
    assert torch.equal(ours.compute(), library.compute())
    ours.reset()
    ours.update(torch.tensor([1.0, 2.0]))
    assert ours.compute() == 1.5


def test_training_backpropagates_the_summed_loss_with_adam():
    torch.manual_seed(0)
    module = VAEModule.from_settings({"hidden": [32]}, latent_dim=4, lr=1e-3)
    x = torch.rand(256, 784)
    trainer = _trainer()
    trainer.fit(module, train_dataloaders=tensor_loader(x, 128, True, 0, 0, 1))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    assert opt.defaults["fused"] is True  # the CPU has the fused kernel
    module.log = module.log_dict = lambda *args, **kwargs: None  # outside a loop
    out = module.training_step(x[:10], 0)
    assert out["loss"].requires_grad
    assert out["loss"].item() == pytest.approx(10 * (out["terms"]["rec"] + out["terms"]["kl"]).item(), rel=1e-5)
    for metric in trainer.callback_metrics:
        assert metric.startswith("train/")
    assert {"train/rec", "train/kl", "train/loss"} <= set(trainer.callback_metrics)


def test_bf16_mixed_precision_trains_with_fp32_loss_terms():
    """Under autocast the layers run in bf16; BCE and KL are still summed in fp32."""
    x = torch.rand(512, 784).round()
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = VAEModule.from_settings({"hidden": [64]}, latent_dim=4)
        trainer = L.Trainer(
            accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, max_epochs=2,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=tensor_loader(x, 128, True, 0, 0, 1))
        loss = trainer.callback_metrics["train/loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        losses[precision] = loss.item()
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], rel=0.02)
