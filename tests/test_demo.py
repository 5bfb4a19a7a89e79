import json
import os
import subprocess
import sys

import pytest

from dynconvert.__main__ import DEMO_CPU_PATHS


def test_demo_json_reports_every_figure(cli, tmp_path):
    """A fast variant (few epochs); the full, measured run is `dynconvert demo --json`."""
    code, stdout, stderr = cli("demo", "--json", "--train-epochs", "3", "--finetune-epochs", "1", "--fit-steps", "20",
                               "--out-dir", tmp_path)
    assert code == 0, stderr
    r = json.loads(stdout.strip().splitlines()[-1])
    for key in ("original_accuracy", "converted_accuracy", "finetuned_accuracy", "svd_finetuned_accuracy",
                "converted_layer_compression", "total_compression", "onnx_max_abs_diff", "seconds"):
        assert key in r
    assert r["converted_layers"] == ["conv2", "fc1", "fc2", "fc3"]
    assert r["converted_layer_compression"] >= 8 and r["total_compression"] > 7
    assert r["svd_params"] <= r["converted_layer_state_params"]  # the baseline never gets a bigger budget
    assert r["original_accuracy"] > 0.8 and 0 <= r["finetuned_accuracy"] <= 1  # recovery: test_finetune.py
    assert r["onnx_max_abs_diff"] < 1e-3
    assert {p.name for p in tmp_path.iterdir()} >= {"lenet5.pth", "lenet5.dyn", "lenet5-ft.dyn", "lenet5-ft.onnx"}


@pytest.mark.slow
def test_full_demo_meets_its_claims(tmp_path):
    """The demo's own claims, at its real settings (about 30 s of CPU): fine-tuning recovers the
    original's accuracy to within a point and beats truncated SVD given the same budget and the
    same fine-tuning. Run as `dynconvert demo` runs (a new process): the CPU code paths it pins
    apply only before torch is loaded, and in this process torch already is; unpinned, on an
    AVX-512 machine here the fine-tuned model scored 0.9644 against SVD's 0.9667."""
    done = subprocess.run([sys.executable, "-m", "dynconvert", "demo", "--json", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k not in DEMO_CPU_PATHS})
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["original_accuracy"] > 0.95
    assert r["finetuned_accuracy"] >= r["original_accuracy"] - 0.01
    assert r["finetuned_accuracy"] > r["svd_finetuned_accuracy"]
    assert r["svd_params"] <= r["converted_layer_state_params"] and r["converted_layer_compression"] >= 8
