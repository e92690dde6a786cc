"""Your network, your images: --backbone, --weights and --image-size on the real loading paths,
offline: torchvision's own loader reading published weights from torch's cache (a file of random
weights under the published file name, in tmp_path), a plain state_dict, this project's own
pretraining checkpoint; the classifier cut off; images as the backbone takes them; weights that do
not fit refused in one line.
"""

import argparse
import json
import os

import pytest
import torch
import torchvision
from torch import nn

import transfer_mnist as tm
from sweeps import resume, settings
from sweeps.summary import write_summary
from sweeps.tables import POINTS_RANGE, preregistered


def network_args(**given) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "backbone": "resnet18",
            "weights": None,
            "image_size": None,
            "source": "mnist",
            "data_dir": "unused",
            **given,
        }
    )


def resnet_on_even_odd(weights) -> list[str]:
    """A ResNet-18 from a weights file at 32 pixels, on even/odd."""
    return ["--backbone", "resnet18", "--weights", str(weights), "--image-size", "32",
            "--targets", "even-odd"]


def trained_looking(seed: int) -> dict[str, torch.Tensor]:
    """A ResNet-18 state_dict whose every tensor differs from a fresh network's, BatchNorm's
    statistics too."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if "running_var" in key:
            value.uniform_(0.5, 1.5)
        elif value.is_floating_point():
            value.add_(0.05 * torch.randn_like(value))
        else:
            value.fill_(1000)
    return state


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """torch's cache in tmp_path holding ResNet-18's IMAGENET1K_V1 under its published file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = trained_looking(1)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    return state


def test_published_weights_load_through_torchvision_from_torch_s_cache_without_the_classifier(
    torch_cache, caplog
):
    caplog.set_level("INFO", logger="transfer_mnist")
    args = network_args(weights="IMAGENET1K_V1")
    assert tm.weights_path(args).endswith("hub/checkpoints/resnet18-f37072fd.pth")
    view = tm.resolve_network(args)
    # the published weights' own crop size and stats, RGB
    assert (view.channels, view.size) == (3, (224, 224))
    assert view.mean == (0.485, 0.456, 0.406) and view.std == (0.229, 0.224, 0.225)
    state = tm.read_weights(args, view.channels)
    assert "fc.weight" not in state and len(state) == len(torch_cache) - 2
    assert all(torch.equal(state[key], torch_cache[key]) for key in state)
    assert "--weights IMAGENET1K_V1: 120 tensors, not its classifier's" in caplog.text


def test_default_names_the_published_weights_and_an_unknown_name_or_backbone_is_one_line(
    torch_cache, tiny_data
):
    assert tm.resolve_network(network_args(weights="DEFAULT")).stats == "resnet18 IMAGENET1K_V1's"
    with pytest.raises(
        tm.ExperimentError, match=r"--weights IMAGENET9K: no such file nor weights of resnet18"
    ):
        tm.resolve_network(network_args(weights="IMAGENET9K"))
    with pytest.raises(
        tm.ExperimentError,
        match=r"--backbone resnet19: not lenet nor torchvision's: see make_backbone\(\)",
    ):
        tm.resolve_network(network_args(backbone="resnet19", data_dir=str(tiny_data[0])))


def test_published_weights_missing_offline_name_where_torch_s_cache_expects_them(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(tm.ExperimentError) as err:
        tm.read_weights(network_args(weights="IMAGENET1K_V1"), 3)
    where = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert str(err.value).startswith(f"--weights IMAGENET1K_V1: {where} (from https://")
    assert "Temporary failure" in str(err.value) and "\n" not in str(err.value).split(":")[1]


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "backbone."])
def test_a_state_dict_file_loads_under_one_prefix_and_the_image_size_follows_the_architecture(
    tmp_path, prefix
):
    state = trained_looking(2)
    torch.save({prefix + key: value for key, value in state.items()}, tmp_path / "mine.pt")
    args = network_args(weights=str(tmp_path / "mine.pt"), image_size=64)
    view = tm.resolve_network(args)
    # a file takes the architecture's published stats, at --image-size
    assert (view.channels, view.size, view.stats) == (3, (64, 64), "resnet18 IMAGENET1K_V1's")
    loaded = tm.read_weights(args, 3)
    assert loaded.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_weights_of_another_architecture_or_channel_count_are_refused_naming_the_file(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        tm.ExperimentError,
        match=r"other\.pt does not fit resnet18 with 3 channels: 0 tensors "
        r"missing or other, 96 extra",
    ):
        tm.read_weights(network_args(weights=str(tmp_path / "other.pt")), 3)
    grey = trained_looking(3)
    grey["conv1.weight"] = grey["conv1.weight"][:, :1]
    torch.save(grey, tmp_path / "grey.pt")
    with pytest.raises(
        tm.ExperimentError, match=r"grey\.pt does not fit resnet18 with 3 channels: 1 tensors"
    ):
        tm.read_weights(network_args(weights=str(tmp_path / "grey.pt")), 3)
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(tm.ExperimentError, match=r"--weights .*text\.pt: "):
        tm.read_weights(network_args(weights=str(tmp_path / "text.pt")), 3)


def test_this_project_s_pretraining_checkpoint_is_a_weights_file_for_lenet(tmp_path):
    pretrained = tm.LitModule(tm.TARGETS["mnist"].label_names, learning_rate=1e-3)
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "best.ckpt")
    args = network_args(backbone="lenet", weights=str(tmp_path / "best.ckpt"))
    view = tm.resolve_network(args)
    # its channels from the file, MNIST's 28 pixels; each target's registered stats
    assert (view.channels, view.size, view.mean) == (1, (28, 28), None)
    loaded = tm.read_weights(args, view.channels)
    assert loaded.keys() == pretrained.convnet.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in pretrained.convnet.state_dict().items())


@pytest.mark.parametrize(
    "name, cut",
    [
        ("resnet18", "fc"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
    ],
)
def test_the_backbone_s_final_linear_is_cut_and_the_head_s_width_measured(name, cut):
    module = tm.LitModule(["a", "b", "c"], 1e-3, image_shape=(3, 32, 32), backbone=name)
    assert isinstance(module.convnet.get_submodule(cut), nn.Flatten)
    width = torchvision.models.get_model(name).get_submodule(cut).in_features
    assert module.classification_head[0].in_features == width
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_googlenet_gives_its_logits_alone_in_training_where_it_adds_auxiliary_ones():
    module = tm.LitModule(["a", "b"], 1e-3, image_shape=(3, 64, 64), backbone="googlenet")
    module.train()
    assert module(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    # its published weights still fit: the auxiliary classifiers stay
    assert "aux1.fc2.weight" in module.convnet.state_dict()


def test_a_backbone_without_a_final_linear_stops_in_one_line():
    with pytest.raises(
        tm.ExperimentError, match=r"--backbone squeezenet1_0: no final Linear to cut"
    ):
        tm.make_backbone("squeezenet1_0", 3)


def test_images_take_the_backbone_s_channels_size_and_stats():
    grey = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4, 1)
    rgb_view = tm.View(3, (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "")
    out = tm.prepare(grey, rgb_view)
    assert out.shape == (2, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # grey repeated
    colour = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    colour[..., 1] = 255  # pure green: 0.587 of white in grey
    out = tm.prepare(colour, tm.View(1, (2, 2), (0.0,), (1.0,), ""))
    assert out.shape == (1, 1, 2, 2) and torch.allclose(
        out, torch.full_like(out, 0.587), atol=1 / 255
    )
    # the post's images as they were: 1x28x28, (x / 255 - mean) / std
    mnist = torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8)
    out = tm.prepare(mnist, tm.View(1, (28, 28), (0.1307,), (0.3081,), ""))
    assert torch.equal(out, (mnist.permute(0, 3, 1, 2).float() / 255 - 0.1307) / 0.3081)


def test_a_split_too_large_as_floats_is_held_as_uint8_and_prepared_a_batch_at_a_time(
    tiny_data, monkeypatch
):
    view = tm.View(3, (224, 224), (0.5,) * 3, (0.5,) * 3, "")
    # the 60 test images would take 36 MB as floats: more than this FLOAT_BYTES; the 25 to train and
    # validate fit
    monkeypatch.setattr(tm, "FLOAT_BYTES", 20 * 2**20)
    data = tm.load_data("fashion-mnist", 20, str(tiny_data[0]), seed=0, view=view)
    assert data.test.images.dtype == torch.uint8 and data.shape == (3, 224, 224)
    assert data.train.images.shape == (20, 3, 224, 224) and data.train.images.dtype == torch.float32
    assert data.test.batch_size == 2**22 // (3 * 224 * 224)
    images, labels = next(iter(data.test))
    assert images.shape == (27, 3, 224, 224) and images.dtype == torch.float32 and len(labels) == 27


def test_lenet_turns_a_registered_rgb_target_grey_with_its_stats_averaged(monkeypatch):
    monkeypatch.setitem(
        tm.TARGETS,
        "colours",
        tm.Target(None, ("a", "b"), mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3)),
    )
    view = tm.input_view(tm.View(1, (28, 28), None, None, ""), "colours")
    assert view.mean == pytest.approx((0.4,)) and view.std == pytest.approx((0.2,))
    assert (
        tm.describe("colours", view)
        == "colours: 1x28x28 grey, normalised with colours's registered mean and std"
    )


def test_resume_refuses_other_weights_under_the_same_name(torch_cache, tmp_path):
    cfg = network_args(weights="IMAGENET1K_V1")
    record = resume.weights_record(cfg)
    assert record["weights"] == "IMAGENET1K_V1" and len(record["sha256"]) == 64
    resume.check_weights_unchanged("r.csv", record, cfg)  # the same file: goes on
    torch.save(trained_looking(9), tm.weights_path(cfg))
    with pytest.raises(
        tm.ExperimentError,
        match=r"--resume r\.csv: --weights IMAGENET1K_V1 are not those the "
        r"sweep began with .*SHA-256",
    ):
        resume.check_weights_unchanged("r.csv", record, cfg)
    os.remove(tm.weights_path(cfg))
    with pytest.raises(tm.ExperimentError, match=r"IMAGENET1K_V1 .*: missing, the sweep's "
                       f"{record['sha256'][:12]}\\); put them back, or start a new sweep"):
        resume.check_weights_unchanged("r.csv", record, cfg)


def test_weights_with_a_pretraining_flag_on_the_command_line_is_refused_and_fair_drops_its_grid():
    cfg, given = settings.parse(
        ["--protocol", "fair", "--weights", "DEFAULT", "--backbone", "resnet18"]
    )
    assert cfg.backbone_per_seed is False and cfg.pretrain_lr_grid == ()
    settings.check_weights(cfg, given)  # the protocol's pretraining falls away
    for flag in (
        ["--backbones-from", "x.csv"],
        ["--backbone-per-seed"],
        ["--pretrain-lr-grid", "1e-3"],
    ):
        cfg, given = settings.parse(["--weights", "DEFAULT", "--backbone", "resnet18", *flag])
        with pytest.raises(
            tm.ExperimentError, match=f"nothing is pretrained, so {flag[0]} has no use"
        ):
            settings.check_weights(cfg, given)


def test_only_the_protocol_s_own_sweeps_are_pre_registered():
    for name in ("prereg_even_odd", "prereg_digits", "prereg_fashion", "prereg_augment_digits"):
        config = json.load(open(f"results/{name}.json"))["config"]
        assert settings.protocol_sweep(config), name
    mine = {**json.load(open("results/prereg_even_odd.json"))["config"], "targets": ["photos"]}
    assert not settings.protocol_sweep(mine)
    assert not settings.protocol_sweep({**mine, "targets": ["even-odd"], "weights": "DEFAULT"})
    assert not settings.protocol_sweep(json.load(open("results/fair_200.json"))["config"])


def rows_of_a_sweep(differences: list[float]) -> list:
    from sweeps.runs import RunResult

    rows = []
    for seed, difference in enumerate(differences):
        for mode, acc in (("finetuned", 0.5 + difference), ("from_scratch", 0.5)):
            rows.append(RunResult("photos", mode, seed, 40, 3, 0.5, acc, 1e-3, 0.5, True, 10))
    return rows


def test_a_user_s_sweep_names_nothing_primary_and_holm_runs_over_all_its_comparisons(tmp_path):
    results = rows_of_a_sweep([0.4, -0.45])  # two wild seeds: the t interval leaves [-100, 100]
    table, power = preregistered(results, protocol=False)
    header, rows = list(table.columns), table.values.tolist()
    (row,) = rows
    assert "(primary)" not in row[2] and header[9] == "Holm p (all 1)" and row[9] != ""
    low, high = (float(x) for x in row[6].strip("[]").split(", "))
    assert POINTS_RANGE[0] <= low and high <= POINTS_RANGE[1]
    assert "is 100.0 points" in power
    text = write_summary(results, str(tmp_path / "s.md"), "seed", protocol=False)
    markdown = (tmp_path / "s.md").read_text()
    for shown in (text, markdown):
        assert (
            "pre-registered" not in shown
            and "(primary)" not in shown
            and "p (paired t)" not in shown
        )
    assert "## The comparisons, each seed at its own rate" in markdown


def test_the_template_alone_starts_each_pretrained_arm_from_the_weights_and_from_scratch_from_none(
    tiny_args, tmp_path, monkeypatch, caplog
):
    state = trained_looking(5)
    torch.save(state, tmp_path / "mine.pt")
    weights = {k: v for k, v in state.items() if not k.startswith("fc.")}
    starts, fit = [], tm.fit

    def watched(module, data, mode, *args, **kwargs):
        start = module.convnet.state_dict()
        starts.append(
            (
                mode,
                sum(torch.equal(start[k], v) for k, v in weights.items()),
                data.shape,
                {k: v.clone() for k, v in start.items()},
            )
        )
        trainer, result = fit(module, data, mode, *args, **kwargs)
        starts[-1] += (module.convnet.state_dict(),)
        return trainer, result

    monkeypatch.setattr(tm, "fit", watched)
    caplog.set_level("INFO", logger="transfer_mnist")
    argv = tiny_args + [
        *resnet_on_even_odd(tmp_path / "mine.pt"),
        "--modes",
        "finetuned",
        "from_scratch",
        "frozen",
        "--results-csv",
        str(tmp_path / "r.csv"),
    ]
    assert tm.main(argv) == 0
    # no pretraining: three fits, one per arm, on 3x32x32 images (grey repeated)
    assert [(mode, equal, shape) for mode, equal, shape, *_ in starts] == [
        ("finetuned", len(weights), (3, 32, 32)),
        ("from_scratch", 0, (3, 32, 32)),
        ("frozen", len(weights), (3, 32, 32)),
    ]
    frozen_before, frozen_after = starts[2][3], starts[2][4]
    assert all(
        torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before
    )  # BatchNorm's too
    tuned_before, tuned_after = starts[0][3], starts[0][4]
    assert not torch.equal(tuned_before["conv1.weight"], tuned_after["conv1.weight"])
    assert (
        "even-odd: 3x32x32 RGB, normalised with resnet18 IMAGENET1K_V1's mean and std"
        in caplog.messages
    )
    rows = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == ["finetuned", "from_scratch", "frozen"]


def test_a_copier_s_own_architecture_is_one_branch_in_make_backbone(
    tiny_args, tmp_path, monkeypatch
):
    make_backbone = tm.make_backbone

    def with_mine(name, channels):
        if name == "mynet":
            return nn.Sequential(
                nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
        return make_backbone(name, channels)

    monkeypatch.setattr(tm, "make_backbone", with_mine)
    argv = tiny_args + [
        "--backbone",
        "mynet",
        "--targets",
        "even-odd",
        "--results-csv",
        str(tmp_path / "r.csv"),
    ]
    assert tm.main(argv) == 0
    checkpoint = next((tmp_path / "logs" / "pretrain").glob("version_0/checkpoints/best.ckpt"))
    # its own pretraining checkpoint is a weights file for it, as for lenet
    loaded = tm.read_weights(network_args(backbone="mynet", weights=str(checkpoint)), 1)
    assert list(loaded) == ["0.weight", "0.bias"]


def test_a_sweep_with_weights_gives_the_same_rows_on_local_workers_as_in_one_process(
    tiny_args, tmp_path
):
    from sweeps import cli

    torch.save(trained_looking(7), tmp_path / "mine.pt")
    argv = tiny_args + [
        *resnet_on_even_odd(tmp_path / "mine.pt"),
        "--seeds",
        "2",
        "--threads",
        "1",
    ]
    assert cli.main(argv + ["--results-csv", str(tmp_path / "one.csv")]) == 0
    assert (
        cli.main(
            argv
            + [
                "--workers",
                "2",
                "--log-dir",
                str(tmp_path / "workers"),
                "--results-csv",
                str(tmp_path / "two.csv"),
            ]
        )
        == 0
    )
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    rows = (tmp_path / "one.csv").read_text().splitlines()[1:]
    assert [row.split(",")[1] for row in rows] == [
        "finetuned",
        "from_scratch",
    ] * 2  # nothing pretrained
    settings = json.loads((tmp_path / "two.json").read_text())
    assert settings["weights"]["sha256"] == resume.sha256((tmp_path / "mine.pt").read_bytes())
    assert "Backbone: resnet18 from --weights" in (tmp_path / "two.md").read_text()


class Colours:
    """A 3-channel data set in torchvision's CIFAR10 layout, 32x32: the brightest channel is the
    class."""

    def __init__(self, root, train=True, download=False):
        generator = torch.Generator().manual_seed(0 if train else 1)
        labels = torch.randint(0, 3, (120 if train else 30,), generator=generator)
        images = torch.randint(
            0, 60, (len(labels), 32, 32, 3), generator=generator, dtype=torch.uint8
        )
        for i, label in enumerate(labels.tolist()):
            images[i, :, :, label] += 150
        self.data, self.targets = images.numpy(), labels.tolist()


def test_a_registered_rgb_target_under_the_post_s_mnist_lenet_is_seen_grey_at_28(
    tiny_args, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(
        tm.TARGETS, "colours", tm.Target(Colours, ("r", "g", "b"), mean=(0.3,) * 3, std=(0.3,) * 3)
    )
    tm.read_split.cache_clear()
    caplog.set_level("INFO", logger="transfer_mnist")
    argv = tiny_args + ["--targets", "colours", "--results-csv", str(tmp_path / "r.csv")]
    assert tm.main(argv) == 0  # it ended in a size mismatch after pretraining
    assert (
        "colours: 1x28x28 grey, normalised with colours's registered mean and std"
        in caplog.messages
    )
    rows = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [
        ["mnist", "pretrain"],
        ["colours", "finetuned"],
        ["colours", "from_scratch"],
    ]
