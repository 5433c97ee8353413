"""Every net: its parts, its bound (fast path against the generic one, and against float64), and
the whole path from the CLI (train, test, bound, figures, report in Chromium, eval, every export)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import brief_run, run_cli
from test_report import canvas, open_report, python_decode
from torch import nn

from vae_lightning.export import export
from vae_lightning.model import bound
from vae_lightning.model.bound import iw_log_likelihood
from vae_lightning.model.nets import NETS, conv_transpose_by_fold, net_label, net_settings
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import module_from_checkpoint
from vae_lightning.training.checkpoints import find_checkpoint

NET_SETTINGS = {
    "reference": {"name": "mlp", "hidden": [400], "activation": "relu"},
    "burda": {"name": "mlp", "hidden": [200, 200], "activation": "tanh"},
    "conv": {"name": "conv", "channels": [8, 16]},
}


@pytest.mark.parametrize("net", NET_SETTINGS.values(), ids=NET_SETTINGS.keys())
def test_each_net_encodes_decodes_and_rebuilds_from_its_settings(net):
    torch.manual_seed(0)
    vae = VAE(net, latent_dim=5)
    x = torch.rand(3, 784)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    assert vae.decode_logits(torch.randn(4, 3, 5)).shape == (4, 3, 784)  # k draws per image
    assert vae.sample(6, torch.Generator().manual_seed(1)).shape == (6, 784)
    again = VAE(**json.loads(json.dumps(vae.settings)))  # plain data, as a checkpoint keeps it
    again.load_state_dict(vae.state_dict())
    assert torch.equal(again.decode(mu), vae.decode(mu))
    assert not any(key.startswith(("encoder.", "decoder.")) for key in vae.state_dict())  # flat layer names


def test_bad_net_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="model.net.name='resnet' is not one of mlp, conv"):
        net_settings({"name": "resnet"})
    with pytest.raises(ValueError, match="model.net.channels is not a setting of the mlp net"):
        net_settings({"name": "mlp", "channels": [3]})
    with pytest.raises(ValueError, match="every size must be an integer >= 1"):
        net_settings({"hidden": [400, "wide"]})
    with pytest.raises(ValueError, match="model.net.activation='gelu' is not one of relu, tanh"):
        net_settings({"activation": "gelu"})
    assert net_label(NET_SETTINGS["burda"]) == "mlp 200-200 tanh" and net_label({"name": "conv"}) == "conv 32-64"
    assert set(NETS) == {"mlp", "conv"}


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("net", ["reference", "burda"])
def test_the_fast_bound_equals_the_generic_one(net, likelihood, monkeypatch):
    torch.manual_seed(0)
    vae = VAE(NET_SETTINGS[net], latent_dim=6, likelihood=likelihood).eval()
    x = torch.rand(9, 784)
    x = x if likelihood != "bernoulli" else (x < 0.3).float()
    with torch.no_grad():  # logits up to about +-50, and some at 0 (l / tanh(l / 2) is 0 / 0 there)
        output_layer = vae.linear_head()[2]
        output_layer.weight.mul_(40)
        output_layer.weight[:50], output_layer.bias[:50] = 0, 0
        if likelihood == "gaussian":  # variances from the floor e^-9 to the ceiling e^2, and past both
            vae.likelihood.log_var.copy_(torch.linspace(-11, 3, 784))
    assert vae.linear_head() is not None
    fast = iw_log_likelihood(vae, x, 300, chunk_rows=700, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(vae, "linear_head", lambda: None)
    generic = iw_log_likelihood(vae, x, 300, chunk_rows=700, generator=torch.Generator().manual_seed(3))
    # -log p reaches 1e3 nats here (1e5 for the Gaussian, sigma at its floor): fp32 sums in
    # another order differ by ~2e-7 of that (which CPU's kernels set the order: 1.7e-7 on an AMD
    # EPYC), as both paths differ from a float64 reference
    torch.testing.assert_close(fast, generic, rtol=1e-6, atol=2e-4)


def test_a_decoder_takes_the_fast_path_only_with_all_it_needs():
    vae = VAE(NET_SETTINGS["reference"], latent_dim=4).eval()
    assert vae.linear_head() is not None
    vae.decoder.activation = "gelu"  # an activation the bound does not run itself
    assert vae.linear_head() is None
    del vae.decoder.activation  # a user's net with an output_layer but not the rest
    assert vae.linear_head() is None
    assert torch.isfinite(iw_log_likelihood(vae, (torch.rand(3, 784) < 0.3).float(), 20)).all()


def test_the_conv_decoder_computes_its_layers_plain_form_and_gradients():
    """ConvDecoder writes its activations channels-last through a reordered view of its linear
    map's weights and runs its ReLUs in place: the same logits to the bit as its layers applied
    plainly (NCHW), and the same gradients for every weight, the linear map's included, but for
    the rounding of the convolutions' sums in the other layout (4e-6 relative). Without gradients
    its last layer is a product and a fold: the same logits to fp32 rounding."""
    torch.manual_seed(0)
    decoder = VAE(NET_SETTINGS["conv"], latent_dim=4).decoder
    z = torch.randn(6, 4)

    def plain(z):
        h = torch.relu(decoder.fc(z)).view(-1, *decoder.grid)
        return decoder.deconv2(torch.relu(decoder.deconv1(h))).flatten(1)

    target = torch.rand(6, 784)
    results = []
    for form in (decoder, plain):
        logits = form(z)
        grads = torch.autograd.grad((logits - target).square().sum(), list(decoder.parameters()))
        results.append((logits.detach(), grads))
    (got, got_grads), (want, want_grads) = results
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        folded = decoder(z)
    assert not torch.equal(folded, want)  # the other path ran
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-6)


def test_an_export_records_the_conv_decoders_own_layers_whatever_the_grad_mode(tmp_path):
    """The fold is a CPU speed-up for this process: an exported graph, traced or compiled, keeps
    torch's transposed convolution, even when the export runs without gradients."""
    import onnx

    vae = VAE(NET_SETTINGS["conv"], latent_dim=4)
    with torch.no_grad():
        export(vae, tmp_path, "onnx")
    ops = {node.op_type for node in onnx.load(tmp_path / "decoder.onnx").graph.node}
    assert "ConvTranspose" in ops and "Col2Im" not in ops, ops


@pytest.mark.parametrize("kernel, stride, padding, bias", [(4, 2, 1, True), (3, 1, 0, False), (5, 3, 2, True)])
def test_a_transposed_convolution_by_fold_is_the_layer(kernel, stride, padding, bias):
    """``conv_transpose_by_fold`` against torch's own layer, in float64, values and gradients, on a
    channels-last input as ConvDecoder gives it and a plain one."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(5, 3, kernel, stride=stride, padding=padding, bias=bias).double()
    for h in (
        torch.randn(2, 5, 6, 7, dtype=torch.float64),
        torch.randn(2, 5, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
    ):
        h.requires_grad_(True)
        got, want = conv_transpose_by_fold(h, layer), layer(h)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = [h, *layer.parameters()]
        target = torch.randn_like(want)
        got_grads = torch.autograd.grad((got * target).sum(), weights)
        want_grads = torch.autograd.grad((want * target).sum(), weights)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_conv_nets_bound_against_float64(monkeypatch):
    """The generic path against the textbook formula, in float64, with the same draws of z; its
    decodes in slices of 7 rows, so that a slice starts mid-chunk and mid-image."""
    monkeypatch.setattr(bound, "CPU_DECODE_ROWS", 7)
    torch.manual_seed(0)
    vae = VAE(NET_SETTINGS["conv"], latent_dim=4).eval()
    assert vae.linear_head() is None
    x, k = (torch.rand(5, 784) < 0.3).float(), 40
    got = iw_log_likelihood(vae, x, k, chunk_rows=50, generator=torch.Generator().manual_seed(7))
    vae64, x64 = vae.double(), x.double()
    noise = torch.Generator().manual_seed(7)  # the bound's draws: 4 chunks of 10 z per image
    eps = torch.cat([torch.randn(10, 5, 4, generator=noise) for _ in range(4)])
    with torch.no_grad():
        mu, logvar = vae64.encode(x64)
        z = mu + eps.double() * torch.exp(0.5 * logvar)
        logits = vae64.decode_logits(z)
        log_px = (x64 * logits - torch.nn.functional.softplus(logits)).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        want = torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def net_runs(mnist_dir, tmp_path_factory):
    """A brief CLI run of each preset net other than the default (whose runs the other tests make)."""
    runs = {}
    for preset in ("burda", "conv"):
        run_dir = tmp_path_factory.mktemp(preset)
        runs[preset] = (run_dir, brief_run(run_dir, mnist_dir, f"model={preset}", "eval.k=5", batches=20))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["burda", "conv"])
def test_each_net_trains_tests_and_reports_through_the_cli(preset, net_runs, browser, tmp_path, mnist_dir):
    import onnxruntime as ort

    run_dir, metrics = net_runs[preset]
    assert math.isfinite(metrics["test/iw_nll"]) and metrics["test/iw_nll"] < metrics["test/loss"] + 5
    assert metrics["latent_dim"] == (50 if preset == "burda" else 20)
    for figure in ("samples", "samples_100", "reconstructions", "interpolations", "latent_scatter", "loss_curves"):
        assert (run_dir / f"{figure}.png").stat().st_size > 1000, figure
    # the report's decoder, in Chromium, draws what the checkpoint's decoder draws
    page, _, errors, requests = open_report(browser, run_dir)
    latent = metrics["latent_dim"]
    for z in ([0.0] * latent, np.random.default_rng(0).standard_normal(latent).round(3).tolist()):
        page.goto((run_dir / "report.html").as_uri() + "#z=" + ",".join(map(str, z)))
        page.reload()
        assert np.abs(canvas(page) - python_decode(run_dir, z)).max() <= 1.0
    page.close()
    assert errors == [] and all(url.startswith("file://") for url in requests)
    # eval gives the run's own test numbers again from its checkpoint
    evaluated = run_cli("vae_lightning.eval", f"ckpt_path={run_dir}", "eval.k=5", f"hydra.run.dir={tmp_path / 'eval'}",
                        f"data.data_dir={mnist_dir}")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-4)
    # every export format computes what the model computes
    vae = module_from_checkpoint(find_checkpoint(run_dir, "best")).model.eval()
    x, z = torch.rand(3, 784), torch.randn(3, latent)
    with torch.no_grad():
        mu, logvar, digits = *vae.encode(x), vae.decode(z)
    export(vae, tmp_path / "onnx", "onnx")
    got = ort.InferenceSession(tmp_path / "onnx" / "decoder.onnx").run(None, {"z": z.numpy()})[0]
    assert np.abs(got - digits.numpy()).max() <= 1e-5
    got_mu = ort.InferenceSession(tmp_path / "onnx" / "encoder.onnx").run(None, {"x": x.numpy()})[0]
    assert np.abs(got_mu - mu.numpy()).max() <= 1e-4
    export(vae, tmp_path / "ts", "torchscript")
    torch.testing.assert_close(torch.jit.load(tmp_path / "ts" / "decoder.pt")(z), digits)
    export(vae, tmp_path / "st", "safetensors")
    from safetensors.torch import load_file

    fresh = VAE(**json.loads((tmp_path / "st" / "vae.json").read_text()))
    fresh.load_state_dict({**load_file(tmp_path / "st" / "encoder.safetensors"),
                           **load_file(tmp_path / "st" / "decoder.safetensors")})  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x), (mu, logvar))
