"""More than one machine, simulated on this one: two "nodes" with one process each on the loopback,
started the way Lightning's multi-node environment and a 2-task Slurm job start them."""

import signal

import pytest
from helpers import epoch_rows, finish, load_checkpoint, start_two_nodes, wait_until

# 2 processes x 64 images: the global batch of the 1-process run of conftest.trained_run
TWO_EPOCHS = ["data.batch_size=64", "trainer.max_epochs=2", "eval.k=0", "test=false"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["env", "slurm"])
def test_two_nodes_train_write_once_and_agree_with_one_process(kind, trained_run, mnist_dir, tmp_path):
    single_dir, _ = trained_run
    results = finish(start_two_nodes(kind, *TWO_EPOCHS, f"data.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path}"))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    two, one = epoch_rows(tmp_path), epoch_rows(single_dir)
    assert [row["epoch"] for row in two] == ["1", "2"]  # written once, by rank 0
    for epoch in range(2):  # the same global batch: the same losses within noise
        for key in ("train/loss", "val/loss"):
            assert float(two[epoch][key]) == pytest.approx(float(one[epoch][key]), abs=2.5), (epoch, key)
    writers = {events.name.split(".")[-2] for events in (tmp_path / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process (its pid in the file names) wrote TensorBoard
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 1


@pytest.mark.slow
def test_a_sigterm_to_one_node_stops_both_and_the_run_continues(mnist_dir, tmp_path):
    args = ["data.batch_size=64", "+trainer.limit_train_batches=100", "eval.k=0", "test=false"]
    args += [f"data.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path}"]
    procs = start_two_nodes("env", *args, "trainer.max_epochs=20")
    wait_until((tmp_path / "checkpoints" / "last.ckpt").is_file, procs[0], "last.ckpt appeared")
    procs[1].send_signal(signal.SIGTERM)  # the other node goes on until the processes agree to stop
    results = finish(procs, timeout=120)
    assert [code for code, _ in results] == [128 + signal.SIGTERM] * 2
    kept = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] + 1
    kept_line = f"; {tmp_path}/checkpoints/last.ckpt keeps epoch {kept}; continue with ckpt_path="
    node0, node1 = (stderr.strip().splitlines()[-1] for _, stderr in results)
    assert node1.startswith("error: stopped by SIGTERM" + kept_line), node1
    assert node0.startswith("error: stopped with the run's other processes (one of them got a stop signal)" + kept_line)
    again = finish(start_two_nodes("env", *args, f"trainer.max_epochs={kept + 1}", "ckpt_path=last"))
    assert [code for code, _ in again] == [0, 0], again[0][1][-2000:]
    assert [row["epoch"] for row in epoch_rows(tmp_path)] == [str(e) for e in range(1, kept + 2)]
