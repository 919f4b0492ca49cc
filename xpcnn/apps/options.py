"""Click options that several commands share, and the group of ``xpcnn train``'s augmentation options."""

from __future__ import annotations

import os

import click

from ..backends.backend import BACKEND_NAMES
from ..base.errors import printable
from ..data.checkpoint import CHECKPOINT_NAME
from ..training.config import ELASTIC_SIGMA, MAX_CROP, MAX_ELASTIC, TrainConfig
from ..training.runs import CONFIG_NAME, RUN_FILES


def check_not_a_run_file(output) -> None:
    """UsageError where ``output`` (a Path) would replace a file of a run directory (its checkpoint, config...)."""
    if output.name in RUN_FILES and any((output.parent / name).exists() for name in (CONFIG_NAME, CHECKPOINT_NAME)):
        raise click.UsageError(
            f"{printable(output)} is a file of the run in {printable(output.parent)}: pick another --output"
        )


class NonEmptyPath(click.Path):
    """A path option that refuses an empty value: ``--out "$UNSET"`` would name the current directory, and an
    empty ``--data-dir`` or ``--output`` would be taken for one not given; for a directory, also what exists and
    is not one (a device, a FIFO: ``--out /dev/null`` failed later with "File exists")."""

    def convert(self, value, param, ctx):
        if isinstance(value, str | bytes) and not value:
            self.fail("an empty path names nothing", param, ctx)
        if not self.dir_okay and isinstance(value, str) and value.endswith(os.sep):  # Path() would drop the slash
            self.fail(f"{value!r} names a directory (it ends with {os.sep}): name the file", param, ctx)
        path = super().convert(value, param, ctx)
        if not self.file_okay and os.path.exists(path) and not os.path.isdir(path):  # click refuses regular files
            self.fail(f"{click.format_filename(path)!r} exists and is not a directory", param, ctx)
        return path


allow_other_data_option = click.option(
    "--allow-other-data",
    is_flag=True,
    help="Go on although the data files differ from those the run was trained on (their SHA-256).",
)


def device_options(command):
    """--device and --backend, shared by the commands that compute."""
    command = click.option(
        "--backend",
        type=click.Choice(BACKEND_NAMES),
        default=None,
        help="Array library (default: from --device: cupy for CUDA, numpy for the CPU; train's recipes quick, best "
        "and fashion take jax on the CPU where it is installed).",
    )(command)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        metavar="auto|cpu|cuda|cuda:N",
        help="Where to compute; auto uses a CUDA GPU when the backend (CuPy by default) can, else the CPU.",
    )(command)


AUGMENTATION_OPTIONS = [  # in the order of --help; applied to the images in the order of Augmentation
    click.option(
        "--augment/--no-augment",
        default=TrainConfig.augment,
        show_default=True,
        help="Random shifts, rotations and scaling of the training images, on the device.",
    ),
    click.option(
        "--elastic",
        type=click.FloatRange(0.0, MAX_ELASTIC),
        default=TrainConfig.elastic,
        show_default=True,
        metavar="ALPHA",
        help="Elastic distortion of the training images (Simard et al. 2003), ALPHA pixels strong; 0 is off.",
    ),
    click.option(
        "--elastic-sigma",
        type=click.FloatRange(*ELASTIC_SIGMA),
        default=TrainConfig.elastic_sigma,
        show_default=True,
        help="Smoothness of the elastic distortion: the Gaussian's standard deviation in pixels.",
    ),
    click.option(
        "--flip/--no-flip",
        default=TrainConfig.flip,
        show_default=True,
        help="Mirror each training image left to right with probability 1/2 (for clothing, not digits).",
    ),
    click.option(
        "--crop",
        type=click.IntRange(0, MAX_CROP),
        default=TrainConfig.crop,
        show_default=True,
        metavar="PIXELS",
        help="Pad each training image by PIXELS of background and crop it back at a random offset; 0 is off.",
    ),
    click.option(
        "--erase",
        type=click.FloatRange(0.0, 1.0),
        default=TrainConfig.erase,
        show_default=True,
        metavar="P",
        help="With probability P, set a random rectangle of each training image (2-33% of it) to the background "
        "(random erasing, torchvision's RandomErasing); 0 is off.",
    ),
]


def augmentation_options(command):
    """--augment, --elastic, --elastic-sigma, --flip, --crop and --erase: how training images are varied."""
    for option in reversed(AUGMENTATION_OPTIONS):
        command = option(command)
    return command
