"""Shared fixtures: tiny MNIST and FashionMNIST raw files, written in the real IDX format.

The tests load them through torchvision's own MNIST / FashionMNIST classes, as the experiment
does with the real files, so no test needs the network.
"""

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transfer_mnist  # noqa: E402  (after the path above)

# Ray binds to this machine's network address unless told otherwise: the tests stay on loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# `python -m sweeps` in a subprocess started in another folder finds the package
REPO = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
SWEEPS = [sys.executable, "-m", "sweeps"]


def template_args(log_dir, *argv: str, **settings):
    """The template's settings for a fit on the CPU, logging under log_dir, with `settings` set on them."""
    args = transfer_mnist.parse_args(["--log-dir", str(log_dir), *argv])
    for name, value in settings.items():
        setattr(args, name, value)
    return args


def sweep_settings(argv: list[str]):
    """The completed settings of a `python -m sweeps` command line."""
    from sweeps.settings import parse

    return parse(argv)[0]


def pytest_configure(config):
    """The library warnings that main() filters are filtered in the tests too, from the same list;
    the slow tier is named."""
    for message in transfer_mnist.LIBRARY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}")
    config.addinivalue_line("markers", "slow: end-to-end runs, Ray and clusters: pytest -m 'not slow' "
                            "leaves them out")


# The slow tier, by what a test does: every end-to-end run of main() on the tiny data (tiny_args),
# and every test of Ray, its faults and clusters (these two files)
SLOW_FILES = {"test_ray.py", "test_resume_and_stop.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tiny_args" in item.fixturenames or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)

N_TRAIN_IMAGES = 300  # per dataset: enough for --n-pretrain 40 and --n-train 20 with validation
N_TEST_IMAGES = 60
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (the format of the MNIST raw files)."""
    header = struct.pack(">HBB", 0, IDX_UBYTE, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    path.write_bytes(header + tensor.to(torch.uint8).contiguous().numpy().tobytes())


def make_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise plus a bright bar whose row depends on the label, so a small net can learn it."""
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images


def write_dataset(root: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Write <root>/<name>/raw/{train,t10k}-{images,labels}-idx?-ubyte; return the labels written."""
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    written = {}
    for prefix, n in (("train", N_TRAIN_IMAGES), ("t10k", N_TEST_IMAGES)):
        labels = torch.randint(0, 10, (n,), generator=generator)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", make_images(labels, generator))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = labels
    return written


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A data dir holding tiny MNIST and FashionMNIST; also returns the labels written to it."""
    root = tmp_path_factory.mktemp("data")
    labels = {"MNIST": write_dataset(root, "MNIST", 1), "FashionMNIST": write_dataset(root, "FashionMNIST", 2)}
    return root, labels


def tiny_argv(root: Path, log_dir: Path) -> list[str]:
    """Command-line arguments for a complete experiment on the tiny data in root, in seconds."""
    return [
        "--data-dir", str(root), "--log-dir", str(log_dir),
        "--n-pretrain", "40", "--n-train", "20", "--pretrain-epochs", "2", "--train-epochs", "3",
    ]


@pytest.fixture
def tiny_args(tiny_data, tmp_path) -> list[str]:
    """tiny_argv(), logging below the test's tmp_path."""
    return tiny_argv(tiny_data[0], tmp_path / "logs")


def write_image_folder(root: Path, classes=("box", "disc", "bar"), per_class=None) -> Path:
    """A tiny ImageFolder target: RGB PNGs of 40x40 pixels (not MNIST's size or mode), one folder per
    class, each class a bright patch in its own place so that a small net can learn it."""
    from PIL import Image

    per_class = per_class or {"train": 16, "test": 4}
    generator = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 60, (40, 40, 3), generator=generator, dtype=torch.uint8)
                pixels[4 + 10 * c : 12 + 10 * c, 5:35] = 255
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "shapes")


@pytest.fixture
def tail_ray_log():
    """tail_ray_log(raytmp): a `tail -f` of a Ray session's raylet.out below raytmp (RAY_TMPDIR), in a session of
    its own: a process that names the Ray session and that no sweep started; None if no log appears in time.
    Every tail it started is killed when the test ends, passed or failed."""
    started = []

    def tail(raytmp: Path, seconds: float = 120) -> subprocess.Popen | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            logs = list(raytmp.glob("**/session_*/logs/raylet.out"))
            if logs:
                started.append(subprocess.Popen(["tail", "-f", str(logs[0])], stdout=subprocess.DEVNULL,
                                                start_new_session=True))
                return started[-1]
            time.sleep(0.2)
        return None

    yield tail
    for process in started:
        process.kill()
        process.wait()
