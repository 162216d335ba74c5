"""The options and parameter types shared by cbir's commands; every range comes from specs.SPEC."""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any

import click

from pipeline import api, errors
from pipeline.config import DEFAULTS
from pipeline.errors import CbirError
from pipeline.specs import ENV_INTS, SEARCH_PARAMS, SPEC, Spec, env_int

# Click 8.2+ raises this for a bare group (8.1 prints the help and exits 0 itself).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineGroup(click.Group):
    """A group whose usage errors are one line on stderr, `cbir: error: ...`, like all others.

    Click would print Usage, Try and Error lines; scripts and people read one.
    --help and --version still print and exit 0; a bare group still shows its help.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            # With standalone_mode=False Click raises its errors instead of printing
            # them, and returns the exit code of --help/--version instead of exiting.
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:
            e.show()  # `cbir` or `cbir bench` alone: the help is the answer
            sys.exit(e.exit_code)
        except click.ClickException as e:
            lines = [line.strip() for line in e.format_message().splitlines() if line.strip()]
            message = "; ".join(lines)
            ctx = getattr(e, "ctx", None)
            if isinstance(e, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            print(f"cbir: error: {message}", file=sys.stderr)
            sys.exit(e.exit_code)
        except click.Abort:
            print("cbir: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that refuses NaN (which passes every comparison) and infinities."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class CountRange(click.IntRange):
    """An IntRange that also reads counts written like 1e3."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            number = float(value)
            if math.isfinite(number) and number.is_integer():
                value = int(number)
        except (TypeError, ValueError):
            pass  # IntRange says what is wrong
        return super().convert(value, param, ctx)


class CommaList(click.ParamType):
    """'a,b,c' -> a list, each item converted by `item`."""

    name = "list"

    def __init__(self, item: click.ParamType):
        self.item = item

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, list):
            return value
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items:
            self.fail("give at least one value, comma-separated", param, ctx)
        return [self.item.convert(x, param, ctx) for x in items]


class MemorySize(click.ParamType):
    """A memory budget such as 2GB or 512MB, in bytes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        try:
            return api.parse_size(value)
        except CbirError as e:
            self.fail(str(e), param, ctx)


class WritablePath(click.Path):
    """A file or folder cbir will write: refused while parsing, before any work, when it cannot
    be made there (a file on the way, a symlink loop, a folder where a file goes)."""

    def __init__(self, folder: bool) -> None:
        super().__init__(file_okay=not folder, dir_okay=folder)
        self.folder = folder

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        value = super().convert(value, param, ctx)
        if problem := errors.path_problem(value, self.folder):
            self.fail(problem, param, ctx)
        return value


# Paths that variables name, checked as their options are: (variable, a folder?, the option).
_ENV_PATHS = (
    ("CBIR_CATALOG", False, "catalog"),
    ("CBIR_INDEX_DIR", True, "index_dir"),
    ("CBIR_CRASH_LOG", False, None),
)


def check_environment(flags: dict[str, Any]) -> None:
    """Refuse a bad CBIR_* variable in one line before a command does anything.

    Variables are otherwise read where they act (CBIR_THREADS when the model is
    built, CBIR_CRASH_AFTER at each write step), which may be after the catalog
    was written. A path variable whose option is among `flags` is not used, so
    not checked.
    """
    from pipeline import raycluster

    for var in ENV_INTS:
        env_int(var)
    for var, folder, option in _ENV_PATHS:
        value = os.environ.get(var)
        if not value or (option and flags.get(option)):
            continue
        if problem := errors.path_problem(value, folder):
            raise CbirError(f"{var}: {problem}")
    raycluster.logs_wanted()


def typed(spec: Spec) -> click.ParamType:
    """The Click type of a setting's spec (pipeline/specs.py), so each range is written once."""
    if spec.kind == "int":
        return click.IntRange(spec.lo, spec.hi)
    if spec.kind == "float":
        return FiniteFloatRange(spec.lo, spec.hi, min_open=spec.lo_open, max_open=spec.hi_open)
    if spec.kind == "choice":
        return click.Choice(spec.choices)
    raise ValueError(f"no Click type for {spec.kind!r}")


def check_params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    """Refuse a bad --param NAME=VALUE while parsing, before any work."""
    try:
        api.parse_params(list(values))
    except CbirError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return values


def common_options(f):
    """--catalog, --index-dir, --weights, --config on every command (None = not given)."""

    @click.option(
        "--config",
        "config",
        type=click.Path(dir_okay=False),
        envvar="CBIR_CONFIG",
        help="TOML file with any option; flags override it.",
    )
    @click.option(
        "--weights",
        default=None,
        help="'imagenet' (download once) or a local weights file [env CBIR_WEIGHTS].",
    )
    @click.option(
        "--index-dir",
        "index_dir",
        default=None,
        type=WritablePath(folder=True),
        help=f"Folder of FAISS index files [default {DEFAULTS['index_dir']}; env CBIR_INDEX_DIR].",
    )
    @click.option(
        "--catalog",
        default=None,
        type=WritablePath(folder=False),
        help=f"SQLite catalog [default {DEFAULTS['catalog']}; env CBIR_CATALOG].",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        with errors.one_line(kwargs.get("catalog")):
            check_environment(kwargs)
            return f(*args, **kwargs)

    return wrapper


def job_options(f):
    """--workers, --batch-size, the descriptor and --max-pixels: how an indexing job
    decodes and embeds (cbir index, cbir watch)."""
    f = click.option(
        "--max-pixels",
        "max_pixels",
        type=typed(SPEC["max_pixels"]),
        default=None,
        help="Refuse images with more pixels, in the file or once resized for the model "
        "(decompression bombs); and images thinner than 50:1.",
    )(f)
    f = descriptor_options(f)
    f = click.option(
        "--batch-size",
        "batch_size",
        type=typed(SPEC["batch_size"]),
        default=None,
        help="Images per model batch.",
    )(f)
    return click.option(
        "--workers", type=typed(SPEC["workers"]), default=None, help="Decoding threads."
    )(f)


def descriptor_options(f):
    """--pooling, --input, --image-size, --scales: the descriptor, fixed per catalog."""

    @click.option(
        "--pooling",
        type=typed(SPEC["pooling"]),
        default=None,
        help="Pooling of the feature maps: avg, gem or rmac (R-MAC) [default: the catalog's, "
        "else avg]; fixed per catalog.",
    )
    @click.option(
        "--input",
        "input",
        type=typed(SPEC["input"]),
        default=None,
        help="crop (shorter side --image-size, central square) or whole (the whole image at "
        "its aspect ratio) [default: the catalog's, else crop]; fixed per catalog.",
    )
    @click.option(
        "--image-size",
        "image_size",
        type=typed(SPEC["image_size"]),
        default=None,
        help="Shorter side in pixels the network sees [default: the catalog's, else 224].",
    )
    @click.option(
        "--scales",
        default=None,
        help="Scales of --image-size, e.g. 1,0.7071,0.5: a descriptor each, summed "
        "[default: the catalog's, else 1].",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    return wrapper


def runtime_options(f):
    """--runtime, --precision, --calibration, --allow-mixed on the commands that run the model."""

    @click.option(
        "--runtime",
        type=typed(SPEC["runtime"]),
        default=None,
        help="Inference runtime [default auto: the catalog's, or for a new catalog OpenVINO "
        "when installed, else Keras].",
    )
    @click.option(
        "--precision",
        type=typed(SPEC["precision"]),
        default=None,
        help="Model precision [default auto: the catalog's, or the fastest this CPU supports: "
        "int8 with VNNI, bf16 with AVX512-BF16/AMX, else fp32].",
    )
    @click.option(
        "--calibration",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="int8: a folder of calibration images [default: 300 images of the collection, "
        "chosen by a seeded rule].",
    )
    @click.option(
        "--allow-mixed",
        "allow_mixed",
        is_flag=True,
        default=None,
        help="Allow adding vectors from another runtime or precision of the catalog's model.",
    )
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


def search_param_options(f):
    @click.option(
        "--param",
        "params",
        multiple=True,
        metavar="NAME=VALUE",
        callback=check_params,
        help="FAISS search parameter, e.g. nprobe=32 or efSearch=128 (repeatable).",
    )
    @click.option(
        "--nprobe",
        type=typed(SEARCH_PARAMS["nprobe"]),
        default=None,
        help="Shorthand for --param nprobe=N.",
    )
    @click.option(
        "--ef-search",
        "ef_search",
        type=typed(SEARCH_PARAMS["efSearch"]),
        default=None,
        help="Shorthand for --param efSearch=N.",
    )
    @functools.wraps(f)
    def wrapper(*args, nprobe=None, ef_search=None, params=(), **kwargs):
        params = list(params)
        if nprobe is not None:
            params.append(f"nprobe={nprobe}")
        if ef_search is not None:
            params.append(f"efSearch={ef_search}")
        return f(*args, params=params, **kwargs)

    return wrapper
