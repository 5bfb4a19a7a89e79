import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynconvert
from dynconvert.io.data import digits, preprocess_for
from dynconvert.cli.demo import INPUT_SIZE
from dynconvert.dynamics.modules import DynLinear, DynSpec
from dynconvert.dynfile.format import read_dyn
from dynconvert.errors import DynError
from dynconvert.train.evaluation import evaluate
from dynconvert.train.finetune import FinetuneOptions, finetune, finetune_file
from dynconvert.train.trainable import structural_entropy
from finetune_helpers import FACTORY, lenet_files
from helpers import env, run

PY = sys.executable


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return lenet_files(tmp_path_factory.mktemp("lenet"))


@pytest.fixture(scope="module")
def data():
    return digits(preprocess_for(None, INPUT_SIZE))


def test_structural_entropy_bounds():
    layer = DynLinear(6, 4, False, DynSpec(2, 1, "l1", "linear"))
    with torch.no_grad():
        layer.states_out.copy_(torch.zeros(2, 4, 1))
        layer.states_in.copy_(torch.ones(2, 6, 1))
        layer.coupling.fill_(1.0)
    assert structural_entropy(layer) == pytest.approx(1.0)  # every relation equal
    with torch.no_grad():
        layer.states_in[0, 0] = 100.0  # one relation dominates
    assert 0 < structural_entropy(layer) < 0.7


def test_finetune_recovers_accuracy_and_writes_dyn(files, data, tmp_path):
    pth, dyn = files
    converted = dynconvert.load(dyn, factory=FACTORY)
    before = evaluate(converted, data.val)["top1"]
    logs = []
    opts = FinetuneOptions(epochs=2, optimizer="adam", lr=1e-2, train="states+bias", stop_tol=0)
    out = tmp_path / "ft.dyn"
    res = finetune_file(dyn, out, "digits", opts, teacher=pth, factory=FACTORY, log=logs.append)
    after = evaluate(dynconvert.load(out, factory=FACTORY), data.val)["top1"]
    assert after > before + 0.1
    epochs = [r for r in logs if r["event"] == "epoch"]
    assert len(epochs) == 2 and res.steps == 2 * 22
    assert set(epochs[-1]["structural_entropy"]) == {"conv2", "fc1", "fc2"}
    assert all(0 < v <= 1 for v in epochs[-1]["structural_entropy"].values())
    _, meta = read_dyn(out)
    assert meta["finetune"]["steps"] == res.steps and meta["finetune"]["teacher"] == str(pth)
    assert set(meta["finetune"]["rel_error_vs_original"]) == {"conv2", "fc1", "fc2"}
    assert meta["layers"].keys() == read_dyn(dyn)[1]["layers"].keys()
    assert not Path(f"{out}.ckpt").exists()  # removed once the output is written


def test_default_sgd_moves_states_and_lowers_loss(files, data):
    _, dyn = files
    model = dynconvert.load(dyn, factory=FACTORY)
    before = model.fc1.states_out.detach().clone()
    logs = []
    finetune(model, data, FinetuneOptions(epochs=2, stop_tol=0, lr=0.05), log=logs.append)
    assert not torch.equal(before, model.fc1.states_out)
    assert logs[-1]["loss"] < logs[0]["loss"] or logs[-1]["val_top1"] > logs[0]["val_top1"]


def test_early_stop_when_states_stabilize(files, data):
    _, dyn = files
    model = dynconvert.load(dyn, factory=FACTORY)
    res = finetune(model, data, FinetuneOptions(epochs=5, stop_tol=10.0, stop_window=3))
    assert res.stopped_early and res.steps == 3


def test_distillation_on_unlabeled_images(files, data, tmp_path):
    pth, dyn = files
    with pytest.raises(DynError, match="no labels; pass --teacher"):
        finetune_file(dyn, tmp_path / "x.dyn", "digits", FinetuneOptions(max_steps=2), factory=FACTORY, unlabeled=True)
    out = tmp_path / "kd.dyn"
    finetune_file(dyn, out, "digits", FinetuneOptions(max_steps=3, optimizer="adam", lr=1e-2), teacher=pth,
                  factory=FACTORY, unlabeled=True)
    assert read_dyn(out)[1]["finetune"]["labeled"] is False


def test_cli_finetune_and_eval_side_by_side(cli, files, tmp_path):
    pth, dyn = files
    out = tmp_path / "ft.dyn"
    code, stdout, stderr = cli("finetune", dyn, "--data", "digits", "--out", out, "--model", FACTORY,
                               "--max-steps", "5", "--optimizer", "adam", "--lr", "0.01")
    assert code == 0, stderr
    assert "epoch 1/1" in stdout and "entropy conv2=" in stdout and f"wrote {out}" in stdout
    code, stdout, stderr = cli("eval", out, "--data", "digits", "--model", FACTORY, "--original", pth, "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert list(rows) == [str(pth), str(out)] and all(r["n"] == 450 and r["top5"] >= r["top1"] for r in rows.values())
    code, _, stderr = cli("finetune", dyn, "--data", "digits", "--out", out, "--model", FACTORY)
    assert code == 2 and "already exists" in stderr


@pytest.mark.slow
def test_resume_after_kill_continues_from_checkpoint(files, tmp_path):
    _, dyn = files
    out, ckpt = tmp_path / "ft.dyn", tmp_path / "ft.dyn.ckpt"
    cmd = [PY, "-m", "dynconvert", "finetune", str(dyn), "--data", "digits", "--out", str(out), "--model", FACTORY,
           "--batch-size", "16", "--checkpoint-every", "3", "--stop-tol", "0", "--epochs", "1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint within 60 s"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # killed: no output, certainly not a half-written one
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step >= 3 and step % 3 == 0
    done = run(cmd[:-2] + ["--epochs", "1000", "--max-steps", str(step + 4), "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {ckpt} at step {step}" in done.stdout
    fin = read_dyn(out)[1]["finetune"]
    assert fin["resumed_from"] == step and fin["steps"] == step + 4
    # a checkpoint of another input is refused
    torch.save({"fingerprint": "another input", "step": 1}, tmp_path / "c.ckpt")
    with pytest.raises(DynError, match="belongs to another run"):
        finetune_file(dyn, tmp_path / "o2.dyn", "digits", FinetuneOptions(), factory=FACTORY, resume=True,
                      checkpoint=tmp_path / "c.ckpt")


def test_resume_with_other_settings_is_a_one_line_error(files, tmp_path):
    _, dyn = files
    out = tmp_path / "ft.dyn"
    finetune_file(dyn, out, "digits", FinetuneOptions(max_steps=2), factory=FACTORY, keep_checkpoint=True)
    with pytest.raises(DynError, match="does not fit this run"):
        finetune_file(dyn, out, "digits", FinetuneOptions(max_steps=4, optimizer="adam", train="all"), factory=FACTORY,
                      resume=True)


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_states(files, tmp_path):
    _, dyn = files
    trace = tmp_path / "trace"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dynconvert",
           "finetune", str(dyn), "--data", "fake", "--out", str(tmp_path / "ddp.dyn"), "--model", FACTORY,
           "--epochs", "2", "--batch-size", "8", "--lr", "0.5", "--stop-tol", "0"]
    done = run(cmd, tmp_path, DYNCONVERT_STATE_TRACE=str(trace))
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = (tmp_path / "trace.rank0").read_text().split("\n")
    r1 = (tmp_path / "trace.rank1").read_text().split("\n")
    # 64 fake images, 2 ranks x 8 per step: 4 steps per epoch
    assert len([l for l in r0 if l]) == 8 and r0 == r1
    assert len({l.split()[1] for l in r0 if l}) == 8  # the states moved at every step
    fin = read_dyn(tmp_path / "ddp.dyn")[1]["finetune"]
    assert fin["world_size"] == 2 and fin["steps"] == 8
