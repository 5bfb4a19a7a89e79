import numpy as np
import pytest
import torch
from PIL import Image

from dynconvert.io.data import Preprocess, digits, open_data, preprocess_for
from dynconvert.errors import DynError
from finetune_helpers import FACTORY, lenet_files

PRE = Preprocess(3, 32, 36, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def write_images(folder, n, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_digits_split_is_fixed_and_held_out():
    pre = preprocess_for(None, (1, 32, 32))
    a, b = digits(pre), digits(pre)
    xtr, ytr = a.train.tensors
    xte, yte = a.val.tensors
    assert xtr.shape == (1347, 1, 32, 32) and xte.shape == (450, 1, 32, 32)
    assert torch.equal(xte, b.val.tensors[0]) and torch.equal(yte, b.val.tensors[1])
    assert set(yte.tolist()) == set(range(10)) and a.num_classes == 10
    # no test image is also a training image
    flat_tr = {tuple(r) for r in xtr.flatten(1)[:, ::7].tolist()}
    assert sum(tuple(r) in flat_tr for r in xte.flatten(1)[:, ::7].tolist()) < 5
    assert digits(preprocess_for(None, (3, 64, 64))).train.tensors[0].shape[1:] == (3, 64, 64)


def test_torchvision_preprocessing_comes_from_the_arch():
    p = preprocess_for({"kind": "torchvision", "arch": "resnet50"}, (3, 224, 224))
    assert (p.size, p.resize, p.mean) == (224, 232, (0.485, 0.456, 0.406))
    assert preprocess_for({"kind": "torchvision", "arch": "resnet50"}, (3, 32, 32)).size == 32


def test_imagefolder_train_val_and_single_and_flat(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            write_images(tmp_path / "tree" / split / c, 3)
    d = open_data(str(tmp_path / "tree"), PRE)
    assert d.num_classes == 2 and len(d.train) == 6 and len(d.val) == 6 and d.labeled
    x, y = d.val[4]
    assert x.shape == (3, 32, 32) and y == 1
    single = open_data(str(tmp_path / "tree" / "val"), PRE)
    assert len(single.val) == 6 and single.num_classes == 2
    write_images(tmp_path / "flat", 4)
    flat = open_data(str(tmp_path / "flat"), PRE)
    assert not flat.labeled and flat.val is None and flat.train[0][1] == -1 and len(flat.train) == 4
    hidden = single.unlabeled()
    assert hidden.train[0][1] == -1 and not hidden.labeled


@pytest.mark.parametrize("case", ["missing", "file", "empty", "empty_class", "undecodable"])
def test_bad_data_paths_raise_one_line_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "empty_class":
        (root / "a").mkdir(parents=True)
    elif case == "undecodable":
        write_images(root / "a", 2)
        (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DynError) as e:
        open_data(str(root), PRE)
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg
    if case == "undecodable":
        assert "broken.jpg" in msg


def test_cli_bad_data_errors(cli, tmp_path):
    _, dyn = lenet_files(tmp_path, train_epochs=0)
    (tmp_path / "empty").mkdir()
    for c in ("a", "b", "c"):
        write_images(tmp_path / "three" / c, 1, size=32)
    write_images(tmp_path / "bad" / "a", 1)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"garbage")
    cases = {
        str(tmp_path / "nope"): "no such folder",
        str(tmp_path / "empty"): "empty folder",
        str(tmp_path / "bad"): "cannot decode image",
        str(tmp_path / "three"): "has 3 classes but the model predicts 10",
    }
    for data, want in cases.items():
        for args in (["eval", dyn, "--data", data, "--model", FACTORY],
                     ["finetune", dyn, "--data", data, "--out", tmp_path / "o.dyn", "--model", FACTORY]):
            code, stdout, stderr = cli(*args)
            assert code == 2, (args, stdout, stderr)
            assert want in stderr and stderr.strip().count("\n") == 0 and "Traceback" not in stderr
            assert not (tmp_path / "o.dyn").exists()


def test_finetune_and_eval_on_an_imagefolder_tree(cli, tmp_path):
    _, dyn = lenet_files(tmp_path, train_epochs=0)
    for split in ("train", "val"):
        for c in range(10):
            write_images(tmp_path / "tree" / split / f"class{c}", 2, size=36, seed=c)
    out = tmp_path / "ft.dyn"
    code, stdout, stderr = cli("finetune", dyn, "--data", tmp_path / "tree", "--out", out, "--model", FACTORY,
                               "--batch-size", "8", "--max-steps", "2", "--stop-tol", "0")
    assert code == 0, stderr
    assert "step 2/2" in stdout and "val top-1" in stdout and out.exists()
    code, stdout, stderr = cli("eval", out, "--data", tmp_path / "tree", "--model", FACTORY)
    assert code == 0 and "(20 images)" in stdout, stderr


def test_decode_error_in_a_loader_worker_is_one_line(tmp_path, monkeypatch):
    import dynconvert.io.data as data_mod
    from dynconvert.train.evaluation import evaluate

    write_images(tmp_path / "a", 2)
    (tmp_path / "a" / "zz_broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(data_mod, "CHECK_ALL_UP_TO", 0)  # as for a big folder: not checked up front
    monkeypatch.setattr(data_mod, "CHECK_SAMPLE", 0)
    d = open_data(str(tmp_path), PRE)
    with pytest.raises(DynError) as e:
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1)), d.val, batch_size=1, workers=1)
    assert "zz_broken.png" in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)
