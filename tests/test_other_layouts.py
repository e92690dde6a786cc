"""A copier's template: another data set's layout (numpy HWC images, a list of labels, 3 channels at
32x32), another backbone (BatchNorm and Dropout, a ResNet-18), a frozen backbone that stays frozen, and
what the template says of what it sees. Tiny data only (see conftest.py); no network."""

import csv
import errno

import lightning
import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import template_args
from torch import nn

import transfer_mnist as tm


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Colours:
    """Laid out as torchvision's CIFAR10: uint8 (N, 32, 32, 3) numpy images, a list of labels. The
    brightest channel and the place of a stripe make the class."""

    n_classes = 4

    def __init__(self, root, train=True, download=False):
        rng = np.random.default_rng(0 if train else 1)
        labels = rng.integers(0, self.n_classes, 160 if train else 40)
        images = rng.integers(0, 60, (len(labels), 32, 32, 3)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, :, :, label % 3] += 150
            images[i, (label // 3) * 16 : (label // 3) * 16 + 8] += 40
        self.data, self.targets = images, [int(label) for label in labels]


def bn_dropout_backbone(channels: int) -> nn.Module:
    """A copier's backbone, as a new user writes one: conv, BatchNorm, ReLU blocks and a Dropout."""
    return nn.Sequential(nn.Conv2d(channels, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def resnet18(channels: int) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    return net


def test_a_cifar_layout_data_set_reads_as_uint8_nhwc_with_its_own_normalisation(monkeypatch):
    monkeypatch.setitem(tm.TARGETS, "colours", tm.Target(Colours, ("r", "g", "b", "rg"), mean=(0.3,) * 3,
                                                         std=(0.2, 0.25, 0.3)))
    tm.read_split.cache_clear()
    images, labels = tm.read_split("colours", "unused", True)
    assert images.shape == (160, 32, 32, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == Colours("unused").targets
    data = tm.load_data("colours", 40, "unused", seed=0)
    assert data.train.images.shape == (40, 3, 32, 32)
    train_idx, _ = tm.draw_subset("colours", 40, 160, 0)
    first = torch.as_tensor(Colours("unused").data[train_idx[0].item()]).permute(2, 0, 1).float() / 255
    expected = (first - torch.tensor([0.3, 0.3, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(data.train.images[0], expected)  # each channel by its own mean and std


def test_the_head_s_width_is_measured_from_any_backbone(monkeypatch):
    monkeypatch.setattr(tm, "decapitated_lenet", resnet18)
    module = tm.LitModule(list("abcd"), 1e-3, image_shape=(3, 32, 32))
    assert module.classification_head[0].in_features == 512  # ResNet-18's features
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.slow  # an end-to-end run
def test_a_resnet18_on_cifar_layout_data_runs_the_post_s_runs(tmp_path, monkeypatch):
    """A copier's trial: register a 3-channel 32x32 data set and a ResNet-18; nothing else changes."""
    monkeypatch.setitem(tm.TARGETS, "colours", tm.Target(Colours, ("r", "g", "b", "rg"), mean=(0.3,) * 3,
                                                         std=(0.3,) * 3))
    monkeypatch.setattr(tm, "decapitated_lenet", resnet18)
    tm.read_split.cache_clear()
    csv_path = tmp_path / "r.csv"
    assert tm.main(["--data-dir", "unused", "--log-dir", str(tmp_path / "logs"), "--source", "colours",
                    "--targets", "colours", "--modes", "finetuned", "from_scratch", "frozen", "--n-pretrain", "80",
                    "--pretrain-epochs", "2", "--train-epochs", "2", "--n-train", "40", "--results-csv",
                    str(csv_path)]) == 0
    rows = read_csv(csv_path)
    assert [(r["target"], r["mode"]) for r in rows] == [("colours", "pretrain"), ("colours", "finetuned"),
                                                         ("colours", "from_scratch"), ("colours", "frozen")]
    run = tmp_path / "logs" / "colours" / "frozen" / "version_0" / "n40_seed0_lr0.001"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())  # plain YAML: no Python tags
    assert hparams["image_shape"] == [3, 32, 32] and hparams["label_names"] == ["r", "g", "b", "rg"]


@pytest.mark.parametrize("mode", ["frozen", "lp_ft"])
def test_a_frozen_backbone_with_batchnorm_and_dropout_keeps_every_tensor_and_stays_in_eval_mode(
        tiny_data, tmp_path, monkeypatch, mode):
    root, _ = tiny_data
    monkeypatch.setattr(tm, "decapitated_lenet", bn_dropout_backbone)
    pretrained = tm.LitModule(tm.TARGETS["mnist"].label_names, 1e-3)
    backbone = {k: v + 0.01 for k, v in pretrained.convnet.state_dict().items()}  # not a fresh init
    backbone = {k: v.long() if k.endswith("num_batches_tracked") else v for k, v in backbone.items()}
    frozen_fits, modes_seen = [], set()
    fit, step = tm.fit, tm.LitModule.step

    def watched_fit(module, *args, **kwargs):
        frozen = not module.hparams.train_backbone
        before = {k: v.clone() for k, v in module.convnet.state_dict().items()}
        result = fit(module, *args, **kwargs)
        if frozen:
            frozen_fits.append([k for k, v in before.items() if not torch.equal(v, module.convnet.state_dict()[k])])
        return result

    def watched_step(self, batch, stage):
        if stage == "train" and not self.hparams.train_backbone:
            modes_seen.update(m.training for m in self.convnet.modules())
        return step(self, batch, stage)

    monkeypatch.setattr(tm, "fit", watched_fit)
    monkeypatch.setattr(tm.LitModule, "step", watched_step)
    data = tm.load_data("even-odd", 20, str(root), seed=0)
    tm.train(backbone, mode, data, template_args(tmp_path, "--train-epochs", "10"))
    assert frozen_fits == [[]]  # one frozen fit (frozen; LP-FT's head stage), and not a tensor changed
    assert modes_seen == {False}  # Dropout off and BatchNorm's statistics fixed in every training step


def test_pretrain_runs_from_a_notebook_on_parse_args_alone(tiny_data, tmp_path):
    root, _ = tiny_data
    args = tm.parse_args(["--data-dir", str(root), "--log-dir", str(tmp_path), "--n-pretrain", "40",
                          "--pretrain-epochs", "1"])
    path, result = tm.pretrain(args, 0)
    assert result.mode == "pretrain" and tm.read_backbone(path).keys() == tm.decapitated_lenet(1).state_dict().keys()
    assert path.startswith(str(tmp_path / "pretrain" / "version_0"))


def test_a_run_still_improving_at_its_last_epoch_says_so(tiny_args, tmp_path, caplog):
    caplog.set_level("WARNING", logger="transfer_mnist")
    assert tm.main(tiny_args + ["--targets", "even-odd", "--modes", "from_scratch", "--pretrain-lr", "1e-6",
                                "--results-csv", str(tmp_path / "r.csv")]) == 0
    rows = {r["mode"]: r for r in read_csv(tmp_path / "r.csv")}
    said = [r.getMessage() for r in caplog.records if "still improving" in r.getMessage()]
    # at 1e-6 pretraining improves at every epoch: its best epoch is its last, and it says so
    assert rows["pretrain"]["best_epoch"] == rows["pretrain"]["max_epochs"] == "2"
    assert "pretrain: its best epoch was its last: still improving" in said


def test_an_image_folder_or_a_harness_flag_points_to_the_harness_in_one_line(image_folder, capsys):
    for argv in (["--targets", str(image_folder)], ["--seeds", "5"], ["--targets", "cifar"]):
        with pytest.raises(SystemExit) as exit_info:
            tm.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert err.startswith(f"error: {argv[1] if argv[0] == '--targets' else argv[0]} is no flag or target")
        assert err.endswith(f"python -m sweeps {' '.join(argv)}")


def test_a_disk_that_fills_at_pretraining_s_checkpoint_ends_the_run_in_one_line(tiny_args, tmp_path, monkeypatch,
                                                                                 capsys):
    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(lightning.Trainer, "save_checkpoint", full_disk)
    assert tm.main(tiny_args + ["--results-csv", str(tmp_path / "r.csv")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == ["error: [Errno 28] No space left on device: "
                                                 f"'{tmp_path / 'logs' / 'pretrain' / 'version_0' / 'checkpoints' / 'best.ckpt'}'"]
