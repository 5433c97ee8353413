"""report.html in a real browser: headless Chromium (Debian's) driven by Playwright, from file://."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import brief_run, run_cli

from vae_lightning.data.datamodule import MNISTDataModule
from vae_lightning.figures.explorer import MAX_SLIDERS, explorer_data, report_html
from vae_lightning.model.vae import VAE
from vae_lightning.runs.building import module_from_checkpoint


def open_report(browser, run_dir: Path):
    """``run_dir/report.html`` in a new page, with its console errors and network requests."""
    page = browser.new_page(viewport={"width": 1150, "height": 900})
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto((run_dir / "report.html").as_uri())
    return page, run_dir, errors, requests


@pytest.fixture
def report(trained_run, browser):
    """The 3-epoch run's report.html, open."""
    opened = open_report(browser, trained_run[0])
    yield opened
    opened[0].close()


def canvas(page, element_id: str = "decoded") -> np.ndarray:
    """The canvas's grey values (0-255), 28 x 28."""
    values = page.evaluate(
        f"""() => {{ const c = document.getElementById("{element_id}");
        return Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data); }}"""
    )
    return np.array(values, dtype=float).reshape(28, 28, 4)[..., 0]


def python_decode(run_dir: Path, z: list[float]) -> np.ndarray:
    model = module_from_checkpoint(sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))[0]).model.eval()
    with torch.no_grad():
        return model.decode(torch.tensor([z], dtype=torch.float32))[0].view(28, 28).numpy() * 255


@pytest.fixture
def one_epoch_report(mnist_dir, tmp_path, browser):
    """A 1-epoch run's report.html, open."""
    brief_run(tmp_path, mnist_dir)
    opened = open_report(browser, tmp_path)
    yield opened
    opened[0].close()


@pytest.mark.slow
def test_the_report_opens_offline_and_decodes_as_the_model_does(one_epoch_report):
    page, run_dir, errors, requests = one_epoch_report
    assert (run_dir / "report.html").stat().st_size < 3_000_000  # the default model's
    rng = np.random.default_rng(0)
    for z in ([0.0] * 20, rng.standard_normal(20).round(3).tolist(), (2 * rng.standard_normal(20)).round(3).tolist()):
        page.goto((run_dir / "report.html").as_uri() + "#z=" + ",".join(map(str, z)))
        page.reload()  # a new document with the fragment: the contract for links
        assert page.evaluate("() => window.explorer.z") == pytest.approx(z)
        # float32 weights in both; the page rounds to whole grey levels: within 1/255 per pixel
        assert np.abs(canvas(page) - python_decode(run_dir, z)).max() <= 1.0
    assert errors == []
    assert all(url.startswith("file://") for url in requests), requests  # nothing from a network


@pytest.mark.slow
def test_sliders_the_pad_random_z_and_a_test_image_change_what_is_drawn(report):
    page, run_dir, errors, _ = report
    before = canvas(page)
    page.locator("#slider-3").fill("2.5")
    assert page.evaluate("() => window.explorer.z")[3] == pytest.approx(2.5)
    after_slider = canvas(page)
    assert np.abs(after_slider - before).max() > 20
    assert np.abs(after_slider - python_decode(run_dir, page.evaluate("() => window.explorer.z"))).max() <= 1.0

    box = page.locator("#pad").bounding_box()  # the pad's right edge is z = 3 across, its top z = 3 up
    page.mouse.click(box["x"] + 0.75 * box["width"], box["y"] + 0.25 * box["height"])
    z = page.evaluate("() => window.explorer.z")
    assert z[0] == pytest.approx(1.5, abs=0.05) and z[1] == pytest.approx(1.5, abs=0.05)
    assert np.abs(canvas(page) - python_decode(run_dir, z)).max() <= 1.0

    page.click("#random")
    assert page.evaluate("() => window.explorer.z") != z

    page.click("#test-35")  # the gallery holds 10 test images of each class in order: a 3
    z = page.evaluate("() => window.explorer.z")
    model = module_from_checkpoint(sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))[0]).model.eval()
    data = MNISTDataModule(os.environ.get("VAE_DATA_DIR"), download=False)
    data.checked = True
    data.setup("test")
    image = data.test_x[(data.test_y == 3).nonzero()[5, 0]]
    with torch.no_grad():
        mu = model.encode(image.unsqueeze(0))[0][0]
    assert z == pytest.approx(mu.tolist(), abs=1e-5)
    assert np.abs(canvas(page, "original") - (image.view(28, 28).numpy() * 255).round()).max() == 0
    assert np.abs(canvas(page) - python_decode(run_dir, z)).max() <= 1.0
    assert errors == []


def test_large_latent_spaces_get_sliders_along_principal_directions():
    labels = torch.arange(300) % 10
    names = [str(d) for d in range(10)]
    small = explorer_data(VAE({"hidden": [16]}, latent_dim=4), torch.rand(300, 784), labels, names)
    assert small["basis_names"] == ["z[0]", "z[1]", "z[2]", "z[3]"]
    large = explorer_data(VAE({"hidden": [16]}, latent_dim=40), torch.rand(300, 784), labels, names)
    assert len(large["basis"]) == MAX_SLIDERS and large["basis_names"][0] == "PC 1"
    assert len(large["test_labels"]) == 100  # 10 of each class


def test_a_multirun_jobs_page_is_titled_by_its_sweep_and_shows_its_overrides(tmp_path):
    vae, x, labels = VAE({"hidden": [16]}, latent_dim=2), torch.rand(100, 784), torch.arange(100) % 10
    job = tmp_path / "2026-12-01_12-48-20" / "1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- model=conv\n- seed=1\n")
    page = report_html(job, vae, x, labels, [str(d) for d in range(10)])
    assert "<h1>vae_lightning report: 2026-12-01_12-48-20 job 1</h1>" in page
    assert f'<p class="caption">model=conv seed=1 · {job} · checkpoint' in page
    (job / ".hydra" / "overrides.yaml").write_text("{not: [yaml")  # a broken file costs the line only
    page = report_html(job, vae, x, labels, [str(d) for d in range(10)])
    assert f'<p class="caption">{job} · checkpoint' in page


@pytest.mark.slow
def test_report_cli_rebuilds_a_runs_report(trained_run, tmp_path):
    run_dir = tmp_path / "run"  # a copy: the other worker's tests read the shared run's report meanwhile
    shutil.copytree(trained_run[0], run_dir, ignore=shutil.ignore_patterns("report.html", "tensorboard"))
    result = run_cli("vae_lightning.report", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'report'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "report.html").stat().st_size > 1_000_000


@pytest.mark.slow
def test_a_link_follows_what_is_shown_and_a_bad_link_says_so(report):
    page, run_dir, errors, _ = report
    page.click("#test-12")  # a 1
    z = page.evaluate("() => window.explorer.z")
    linked = page.evaluate("() => location.hash")
    assert linked.startswith("#z=") and [float(v) for v in linked[3:].split(",")] == pytest.approx(z, abs=1e-4)
    page.goto((run_dir / "report.html").as_uri() + "#z=1,2,3")
    page.reload()
    said = page.locator("#z-error").inner_text()
    assert said == "This link's #z= has 3 numbers; this model needs 20 (comma-separated). Showing another z."
    assert page.locator("#z-error").is_visible()
    table = page.locator("table").first.inner_text()
    assert "test/active_units" in table and " of 20" in table and "20.000" not in table
    assert page.locator("img[alt='samples_100']").count() == 1
    assert errors == []
