"""The ``layerlie`` command. Every expected error ends in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from layerlie.antialias.ablation import DEFAULT_VARIANTS, ablate, list_variants
from layerlie.measure.aliasing import ALIAS_THRESHOLDS, aliasing, with_aliasing
from layerlie.measure.attribution import attribute
from layerlie.measure.estimators import list_estimators
from layerlie.model.contract import ImagesError, Output, Prepared, prepare
from layerlie.model.data import Images, images, photo_batch
from layerlie.errors import LayerlieError
from layerlie.core.groups import DEFAULT_GROUPS, list_groups, resolve_groups
from layerlie.measure.lie import METHODS, lee, summarize
from layerlie.model.loading import load_model
from layerlie.core.tangent import list_schemes
from layerlie.model.trace import TraceError, trace

console = Console(stderr=False)

EXAMPLES = {
    "models": "examples:\n  layerlie models 'resnet*'\n  layerlie models vit_tiny* --json",
    "layers": ("examples:\n  layerlie layers resnet18 --group translate_x\n"
               "  layerlie layers vit_tiny_patch16_224 --group rotate --estimator shares --n 2 --plot vit.png\n"
               "  layerlie layers resnet50 --group scale --estimator hutchinson --samples 200 --out layers.parquet"),
    "aliasing": ("examples:\n  layerlie aliasing resnet18\n"
                 "  layerlie aliasing vit_tiny_patch16_224 --n 2 --all --out alias.csv"),
    "ablate": ("examples:\n  layerlie ablate resnet18\n"
               "  layerlie ablate vit_tiny_patch16_224 --variants blurpool,filtered --plot vit.png\n"
               "  layerlie ablate resnet50 --images val/ --n 16 --estimator shares --out ablation.csv"),
    "e2e": ("examples:\n  layerlie e2e resnet18\n"
            "  layerlie e2e vit_tiny_patch16_224 --groups translate_x,rotate --n 4 --out lee.csv\n"
            "  layerlie e2e resnet18 --groups 'rotate,affine:tilt=0,0.5,0;0,0,0' --n 2\n"
            "  layerlie e2e resnet18 --groups all,my_groups.toml\n"
            "  layerlie e2e resnet50 --checkpoint weights.safetensors --images photos/ --json"),
}


GROUPS_HELP = ("'all', group names, custom groups 'affine:NAME=a,b,c;d,e,f' (rows of the 2x3 generator) "
               "or 'channel:NAME=row1;row2;row3', and TOML files of [groups.NAME] tables, comma-separated; "
               "names: ")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are three lines: the short usage, the error and its fix, and
    where the help is."""

    commands: argparse._SubParsersAction | None = None

    def add_subparsers(self, **kwargs: object) -> argparse._SubParsersAction:
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_args(self, args: Sequence[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # reported by the subcommand's parser, with its own usage and options
            command = getattr(parsed, "command", None)
            target = self.commands.choices[command] if self.commands and command else self
            target.error(target.unexpected(extra[0]))
        return parsed

    def format_usage(self) -> str:
        words = [self._metavar(a) for a in self._actions if not a.option_strings]
        return f"usage: {' '.join([self.prog, '[options]', *words])}\n"

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {self._with_fix(message)}\n"
                     f"see {self.prog} --help\n")

    @staticmethod
    def _metavar(action: argparse.Action) -> str:
        name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        return f"[{name}]" if action.nargs in ("?", "*") else name

    def _with_fix(self, message: str) -> str:
        missing = message.removeprefix("the following arguments are required: ")
        if missing == message:
            return message
        if missing == "command":
            return f"give a command: {', '.join(self.commands.choices)}"
        return f"give the {missing.upper()}, e.g. {self.prog} resnet18 (a timm name, or package.module:callable)"

    def unexpected(self, token: str) -> str:
        """The error for an argument the parser does not know, with the closest option."""
        if token.startswith("-"):
            flags = [f for a in self._actions if a.help != argparse.SUPPRESS for f in a.option_strings]
            close = difflib.get_close_matches(token.split("=")[0], flags, n=1)
            return f"unknown option {token!r}; " + (f"did you mean {close[0]}?" if close else "leave it out")
        words = " ".join(self._metavar(a) for a in self._actions if not a.option_strings)
        return f"unexpected argument {token!r}: {self.prog} takes {words} and options; write lists comma-separated"


class _Renamed(argparse.Action):
    """A flag's old spelling, kept for one release and hidden from ``--help``: it sets the new
    flag's value and prints a one-line note naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"layerlie: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_renamed(p: argparse.ArgumentParser, old: str, new: str, **kwargs: object) -> None:
    """The flag ``new``, and ``old`` as its deprecated spelling (:class:`_Renamed`)."""
    action = p.add_argument(new, **kwargs)
    p.add_argument(old, dest=action.dest, type=action.type, action=functools.partial(_Renamed, new=new))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}; pass e.g. 8") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}; pass e.g. 8")
    return value


def _size(text: str) -> int | tuple[int, int]:
    """``--size``: ``64`` (square) or ``48x64`` (height x width)."""
    sides = text.lower().split("x")
    if len(sides) > 2 or not all(s.strip().isdigit() and int(s) >= 1 for s in sides):
        raise argparse.ArgumentTypeError(f"must be pixels, SIZE or HEIGHTxWIDTH, got {text!r}; pass e.g. 64 or 48x64")
    return int(sides[0]) if len(sides) == 1 else (int(sides[0]), int(sides[1]))


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="local weights: .safetensors or a torch.save'd state dict")
    p.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights, from the local cache or downloaded")
    p.add_argument("--size", type=_size, default=None,
                   help="image size in pixels, SIZE or HEIGHTxWIDTH (default: the model's data config, else 224)")


def _add_model_args(p: argparse.ArgumentParser, heads: bool = False) -> None:
    p.add_argument("model", help="timm name, or package.module:callable returning a model")
    _add_weights_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--float64", action="store_true", help="compute in double precision")
    p.add_argument("--images", help="folder of images (labels from subfolders); default: embedded photos")
    p.add_argument("--n", type=_positive, default=8, help="number of images (default 8)")
    _add_renamed(p, "--seed", "--init-seed", type=int, default=0, help="seed for random-init weights (default 0)")
    p.add_argument("--output", type=_output, default=None,
                   help="the tensor to measure of a tuple, dict or .logits output: an index or a key (default: the "
                        "first tensor of a tuple, else logits)" + ("; also softmax (default), logits of that tensor, "
                                                                 "or a node name" if heads else ""))


def _output(text: str) -> Output:
    """``--output``: an index where the text is a whole number, else a key, attribute or name."""
    return int(text) if text.lstrip("-").isdigit() else text


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="write the full table: FILE.csv or FILE.parquet")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="layerlie", description=(
        "Measure how equivariant an image model is, and which layers break it."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list timm model names", epilog=EXAMPLES["models"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("e2e", help="end-to-end Lie derivative (the published LEE) per group",
                       epilog=EXAMPLES["e2e"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--groups", default="all", help=GROUPS_HELP + ", ".join(list_groups(compat=True)))
    p.add_argument("--scheme", default="central", choices=list_schemes())
    p.add_argument("--method", default="jvp", choices=METHODS)
    _add_renamed(p, "--batch", "--batch-size", type=_positive, default=4, help="images per pass (default 4)")
    _add_output_args(p)

    p = sub.add_parser("layers", help="attribute the Lie derivative to the graph's nodes",
                       epilog=EXAMPLES["layers"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, heads=True)
    p.set_defaults(n=2)
    p.add_argument("--group", default="translate_x",
                   help="one group: a name or 'affine:NAME=a,b,c;d,e,f' (default translate_x)")
    p.add_argument("--estimator", default="exact", choices=list_estimators(),
                   help="exact contributions, signed shares, or Hutchinson norms (default exact)")
    p.add_argument("--scheme", default="central", choices=list_schemes())
    _add_renamed(p, "--probes", "--samples", type=_positive, default=100, help="Hutchinson probes (default 100)")
    p.add_argument("--top", type=_positive, default=15, help="rows of the top-layers table")
    p.add_argument("--plot", help="write the contribution figure to this PNG/PDF")
    _add_output_args(p)

    p = sub.add_parser("aliasing", help="spectral alias measure of every nonlinearity and downsampling node",
                       epilog=EXAMPLES["aliasing"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.set_defaults(n=2)
    p.add_argument("--all", action="store_true", help="list every measured node, not only the flagged ones")
    _add_output_args(p)

    p = sub.add_parser("ablate", help="anti-aliased variants before/after: LEE, layer types, predictions",
                       epilog=EXAMPLES["ablate"], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.set_defaults(n=2)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(list_variants())} (default %(default)s)")
    p.add_argument("--groups", default=",".join(DEFAULT_GROUPS), help="groups of the end-to-end LEE, the first "
                   "also attributed per layer type (default %(default)s): " + GROUPS_HELP + "see e2e --help")
    p.add_argument("--estimator", default="exact", choices=list_estimators(),
                   help="attribution estimator of the by-type table (default exact)")
    p.add_argument("--scheme", default="central", choices=list_schemes())
    p.add_argument("--filter-size", type=_positive, default=3, help="binomial taps (default 3)")
    p.add_argument("--where", help="restrict the surgery: node names or layer types, comma-separated globs")
    p.add_argument("--plot", help="write the before/after figure to this PNG/PDF")
    _add_output_args(p)
    _add_sweep_parser(sub)
    _add_store_parser(sub)
    _add_view_parsers(sub)
    _add_experiment_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "models": cmd_models, "e2e": cmd_e2e, "layers": cmd_layers, "aliasing": cmd_aliasing,
        "ablate": cmd_ablate, "sweep": cmd_sweep, "store": cmd_store, "figures": cmd_figures, "report": cmd_report,
        "experiment": cmd_experiment}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _one_line
            return handlers[args.command](args)
    except LayerlieError as err:
        print(f"layerlie: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerlie: interrupted", file=sys.stderr)
        return 130


def _one_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    label = "note" if issubclass(category, UserWarning) else "warning"
    print(f"layerlie: {label}: {message}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    import timm

    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.pattern)]
    if not names:
        raise LayerlieError(f"no timm model matches {args.pattern!r}; try a wider pattern like 'resnet*'")
    if args.json:
        print(json.dumps(names))
    else:
        console.print("\n".join(names), highlight=False)
        console.print(f"[dim]{len(names)} models[/dim]")
    return 0


def _model_and_images(args: argparse.Namespace) -> tuple[Prepared, Images]:
    """The model and images under the model contract: a model built for other inputs, or an output
    with no tensor to select, fails here in one line, rather than deep in a pass."""
    torch.manual_seed(args.init_seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float64 if args.float64 else None
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                       device=device, dtype=dtype, size=args.size)
    batch = (images(args.images, model, n=args.n, size=args.size) if args.images
             else photo_batch(model, n=args.n, size=args.size))
    try:
        prepared = prepare(model, batch.x, args.output, heads=args.command == "layers")
    except ImagesError as err:
        raise LayerlieError(f"model {args.model!r}: {err.what}; pass the size it takes with --size") from None
    except LayerlieError as err:
        raise LayerlieError(f"model {args.model!r}: {err}") from None
    return prepared, Images(prepared.x, batch.names, batch.labels)


def _check_out(path: str | None) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.suffix not in {".csv", ".parquet"}:
        raise LayerlieError(f"--out {path!r}: use a .csv or .parquet file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):
            pass
    except OSError as err:
        raise LayerlieError(f"cannot write --out {path!r} ({err.strerror}); choose a writable path") from None
    return out


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write ``table`` atomically: to a temporary name first, then renamed."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LayerlieError(f"cannot write {str(out)!r} ({err.strerror}); free space or choose another "
                            "path") from None


def _save(table: pd.DataFrame, out: Path | None, result: Any, plot: str | None) -> None:
    """Write the table to ``--out`` and the result's figure to ``--plot``, where given."""
    if out is not None:
        write_table(table, out)
    if plot:
        try:
            result.plot().savefig(plot, dpi=120)
        except OSError as err:
            raise LayerlieError(f"cannot write --plot {plot!r} ({err.strerror})") from None


def to_json(payload: object) -> str:
    """Strict JSON: NaN and inf (a spread over one image, say) become null."""
    def finite(v: object) -> object:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(payload), default=str, allow_nan=False)


def progress_bar() -> Progress:
    err = Console(stderr=True)  # off when stderr is a file or pipe, where it would leave a blank line
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True, console=err, disable=not err.is_terminal)


def cmd_e2e(args: argparse.Namespace) -> int:
    groups = resolve_groups(args.groups)
    out = _check_out(args.out)
    prepared, batch = _model_and_images(args)
    with progress_bar() as bar:
        task = bar.add_task(f"{args.model}: {len(groups)} groups", total=len(batch.x))
        table = lee(prepared.model, batch.x, groups, output=prepared.output, scheme=args.scheme, method=args.method,
                    names=batch.names, batch_size=args.batch_size, progress=lambda k: bar.advance(task, k))
    table.insert(0, "model", args.model)
    table["scheme"] = args.scheme
    if out is not None:
        write_table(table, out)
    stats = summarize(table)
    if args.json:
        print(to_json({"model": args.model, "scheme": args.scheme, "method": args.method,
                       "images": len(batch.x),
                       "groups": {g: {"mean": r["mean"], "std": r["std"]} for g, r in stats.iterrows()}}))
        return 0
    grid = Table(title=f"{args.model}: end-to-end LEE over {len(batch.x)} images ({args.scheme} scheme)")
    grid.add_column("group")
    grid.add_column("mean", justify="right")
    grid.add_column("std", justify="right")
    for g, r in stats.iterrows():
        grid.add_row(str(g), f"{r['mean']:.3e}", f"{r['std']:.2e}")
    console.print(grid)
    if out is not None:
        console.print(f"wrote {out}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    chosen = resolve_groups(args.group)
    if len(chosen) != 1:
        raise LayerlieError(f"--group takes one group, got {len(chosen)}; use layerlie e2e for several")
    g = chosen[0]
    prepared, batch = _model_and_images(args)
    with progress_bar() as bar:
        bar.add_task(f"{args.model}: attributing {g.name} ({args.estimator})", total=None)
        try:  # once, for the attribution and the alias measure
            target, output = trace(prepared.model, batch.x, output=prepared.output), prepared.head
        except TraceError:  # attribute falls back to forward hooks and says why
            target, output = prepared.model, args.output or "softmax"
        result = attribute(target, batch.x, g, estimator=args.estimator, scheme=args.scheme, output=output,
                           samples=args.samples)
        if result.settings["granularity"] == "node":
            result = with_aliasing(result, target, batch.x)
    table = result.nodes.assign(model=args.model, group=g.name, scheme=args.scheme, estimator=args.estimator)
    _save(table, out, result, args.plot)
    kind = "absolute" if result.degenerate else "relative"
    if args.json:
        print(to_json({"model": args.model, "group": g.name, "estimator": args.estimator,
                          "lf_norm": float(result.total.norm()), "check": result.check,
                          "residual": None if math.isnan(result.residual) else result.residual,
                          "residual_kind": kind,
                          "by_type": result.by_type().fillna(0).to_dict(orient="index")}))
        return 0
    key = "share" if args.estimator == "shares" else "contribution_norm"
    ranked = result.nodes.sort_values(key, ascending=False, na_position="last", key=lambda c: c.abs())
    grid = Table(title=f"{args.model}: top layers for {g.name} ({args.estimator}, |L F| = "
                       f"{float(result.total.norm()):.3e})", caption=f"alias: spectral alias ratio, * flagged "
                       f"(thresholds {ALIAS_THRESHOLDS})")
    for col in ("node", "layer_type", "local_norm", key, "alias"):  # module and layout: in --out
        grid.add_column(col, justify="right" if col in ("local_norm", key, "alias") else "left")
    for _, r in ranked.head(args.top).iterrows():
        grid.add_row(r["node"], r["layer_type"], f"{r['local_norm']:.3e}", f"{r[key]:.3e}", _alias_cell(r))
    console.print(grid)
    by_type = Table(title="by layer type")
    by_type.add_column("layer type")
    by_type.add_column("contribution", justify="right")
    by_type.add_column("share", justify="right")
    for t, r in result.by_type().iterrows():
        by_type.add_row(str(t), f"{r['contribution_norm']:.3e}", f"{r['share']:.3f}")
    console.print(by_type)
    if result.degenerate:
        console.print("L F is about zero here (e.g. a saturated softmax): shares are undefined")
    console.print(result.check_line())
    return 0


def _alias_cell(row: pd.Series) -> str:
    ratio = row.get("alias_ratio")
    if ratio is None or pd.isna(ratio):
        return ""
    return f"[bold red]{ratio:.3f}*[/bold red]" if row["flagged"] else f"{ratio:.3f}"


def cmd_aliasing(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    prepared, batch = _model_and_images(args)
    with progress_bar() as bar:
        bar.add_task(f"{args.model}: measuring aliasing", total=None)
        table = aliasing(prepared.model, batch.x, output=prepared.output)
    measured = table[table["alias_kind"].notna()]
    if out is not None:
        write_table(measured.assign(model=args.model), out)
    shown = measured if args.all else measured[measured["flagged"]]
    if args.json:
        print(to_json({"model": args.model, "thresholds": ALIAS_THRESHOLDS, "measured": len(measured),
                       "flagged": shown[shown["flagged"]][["node", "alias_kind", "alias_ratio"]]
                       .to_dict(orient="records")}))
        return 0
    grid = Table(title=f"{args.model}: {int(measured['flagged'].sum())} of {len(measured)} measured nodes "
                       f"flagged (thresholds {ALIAS_THRESHOLDS})")
    for col in ("node", "layer_type", "alias_kind", "alias_ratio", "flagged"):
        grid.add_column(col, justify="right" if col == "alias_ratio" else "left")
    for _, r in shown.sort_values("alias_ratio", ascending=False).iterrows():
        grid.add_row(r["node"], r["layer_type"], r["alias_kind"], f"{r['alias_ratio']:.3f}",
                     "yes" if r["flagged"] else "")
    console.print(grid)
    return 0


def _class_indices(labels: list[str] | None) -> torch.Tensor | None:
    """Folder labels as class indices: integers, or ImageNet synsets (n01440764); else None."""
    if not labels:
        return None
    if all(label.isdigit() for label in labels):
        return torch.tensor([int(label) for label in labels])
    from timm.data import ImageNetInfo

    names = {name: i for i, name in enumerate(ImageNetInfo().label_names())}
    if all(label in names for label in labels):
        return torch.tensor([names[label] for label in labels])
    console.print("[dim]labels are neither class indices nor ImageNet synsets: no accuracy[/dim]")
    return None


def cmd_ablate(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    where = [w.strip() for w in args.where.split(",")] if args.where else None
    prepared, batch = _model_and_images(args)
    with progress_bar() as bar:
        bar.add_task(f"{args.model}: ablating {', '.join(variants)}", total=None)
        result = ablate(prepared.model, batch.x, variants=variants, groups=args.groups,
                        labels=_class_indices(batch.labels), estimator=args.estimator, scheme=args.scheme,
                        filter_size=args.filter_size, where=where, output=prepared.output)
    table = result.table.assign(model=args.model, scheme=args.scheme)
    _save(table, out, result, args.plot)
    if args.json:
        print(to_json({"model": args.model, "images": len(batch.x), "settings": result.settings,
                       "variants": result.table.to_dict(orient="records")}))
        return 0
    groups = result.settings["groups"]
    grid = Table(title=f"{args.model}: anti-aliased variants over {len(batch.x)} images ({args.scheme} scheme)")
    grid.add_column("")
    for v in result.table["variant"]:
        grid.add_column(v, justify="right")
    rows = [("replaced nodes", "replaced", "{:d}")]
    rows += [(f"LEE {g}", f"lee_{g}", "{:.3e}") for g in groups]
    rows += [(f"LEE {g} reduction", f"factor_{g}", "{:.2f}x") for g in groups]
    rows += [("top-1 agreement", "top1_agreement", "{:.2f}"), ("output change (TV)", "output_change", "{:.2e}")]
    rows += [("accuracy", "accuracy", "{:.2f}")] if "accuracy" in result.table else []
    rows += [(result.settings["check"], "residual", "{:.1e}")]
    for label, col, fmt in rows:
        grid.add_row(label, *[fmt.format(v) for v in result.table[col]])
    console.print(grid)
    types = Table(title=f"{result.settings['group']}: {result.settings['by_type_value']} by layer type")
    types.add_column("layer type")
    for v in result.by_type.columns:
        types.add_column(v, justify="right")
    for t, r in result.by_type.iterrows():
        types.add_row(str(t), *[f"{x:.2e}" for x in r])
    console.print(types)
    written = [str(f) for f in (args.plot, out) if f is not None]
    if written:
        console.print(f"wrote {' and '.join(written)}")
    return 0


# --- sweep ---------------------------------------------------------------------------------

SWEEP_EXAMPLES = ("examples:\n  layerlie sweep sweeps/smoke.toml --store out/\n"
                  "  layerlie sweep sweeps/smoke.toml --store out/ --resume     # after a crash or kill\n"
                  "  layerlie sweep big.toml --store big/ --address auto       # a cluster this node is in\n"
                  "  layerlie sweep sweeps/smoke.toml --store out/ --workers 0  # serial, no Ray\n"
                  "  layerlie sweep sweeps/paper.toml --check                  # build and trace each model\n"
                  "  layerlie sweep --status out/                               # from another shell")


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    from layerlie.results.sweep import MAX_RETRIES

    p = sub.add_parser("sweep", help="run a TOML spec of models x measures x groups into a store",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="the sweep spec, a TOML file (keys: models, groups, measures, n, seed, ...)")
    p.add_argument("--store", help="the store folder: manifest.json, parts/, failures/ (required to run a sweep)")
    p.add_argument("--workers", type=int, default=None,
                   help="local Ray workers (default: the machine's CPUs); 0 runs serially without Ray")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--resume", action="store_true", help="skip the tasks whose part exists")
    p.add_argument("--dry-run", action="store_true", help="list the tasks and run nothing")
    p.add_argument("--check", action="store_true",
                   help="build every model at random init and trace it, list the ones that fail, run nothing")
    p.add_argument("--force-new", action="store_true",
                   help="start afresh when the store holds a different spec (removes its parts)")
    p.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                   help=f"reruns of a task whose worker or node died, before it is recorded as failed "
                        f"(default {MAX_RETRIES})")
    p.add_argument("--status", metavar="STORE",
                   help="print the finished, failed, running and pending tasks of the sweep writing STORE")


def cmd_sweep(args: argparse.Namespace) -> int:
    from layerlie.results.sweep import node_types, sweep

    if args.status:
        return _sweep_status(args.status)
    if args.check and args.spec:
        return _check_spec(args.spec)
    if not args.spec or not args.store:
        raise LayerlieError("give a SPEC and --store to run a sweep, e.g. layerlie sweep spec.toml --store out/, "
                            "a SPEC with --check to check it, or --status STORE to follow one")
    result = sweep(args.spec, args.store, workers=args.workers, address=args.address, resume=args.resume,
                   dry_run=args.dry_run, force_new=args.force_new, max_retries=args.max_retries)
    skipped = set(result.skipped)
    if args.dry_run:
        for t in result.tasks:
            console.print(f"{t.id}  {'(done)' if t.id in skipped else ''}", highlight=False, soft_wrap=True)
        console.print(f"[dim]{len(result.tasks)} tasks, {len(skipped)} done[/dim]")
        todo = [t for t in result.tasks if t.id not in skipped]
        for kind, count in node_types(result.spec, todo).items():
            console.print(f"{count} to run as {kind}", highlight=False, soft_wrap=True)
        return 0
    console.print(f"{len(result.ran)} tasks ran, {len(skipped)} skipped as done, {len(result.failed)} failed; "
                  f"store {result.store}", highlight=False, soft_wrap=True)
    for task, err in result.failed.items():
        print(f"layerlie: failed: {task}: {err['type']}: {err['message'].splitlines()[0] if err['message'] else ''}",
              file=sys.stderr)
    return 1 if result.failed else 0


def _check_spec(spec: str) -> int:
    """``sweep --check``: one line per model as it is checked, the failures again at the end."""
    from layerlie.results.check import check, failures

    def said(r: Any) -> None:
        state = "ok" if r.ok else f"FAILED at {r.step}"
        console.print(f"{r.model}: {state} ({r.device}, {r.seconds:.1f} s)", highlight=False, soft_wrap=True)

    results = check(spec, each=said)
    failed = failures(results)
    console.print(f"{len(results)} models checked, {len(failed)} failed", highlight=False, soft_wrap=True)
    for line in failed:
        print(f"layerlie: failed: {line}", file=sys.stderr)
    return 1 if failed else 0


# --- store ---------------------------------------------------------------------------------

STORE_EXAMPLES = ("examples:\n  layerlie store compact out/     # merge the parts of each table; --resume still skips "
                  "their tasks")


def _add_store_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="maintain a sweep's store", epilog=STORE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("compact", help="merge the parts of each table into one file, keeping the task index",
                           epilog=STORE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("store", help="a sweep's store folder")


def cmd_store(args: argparse.Namespace) -> int:
    from layerlie.results.store import compact

    merged = compact(args.store)
    said = ", ".join(f"{n} {table}" for table, n in merged.items()) or "none"
    console.print(f"compacted parts: {said}; store {args.store}", highlight=False, soft_wrap=True)
    return 0


def _sweep_status(store: str) -> int:
    """``layerlie sweep --status STORE``: one line of counts and one of the driver (docs/design.md §4)."""
    from layerlie.results.sweep import status

    now = status(store)
    console.print(f"{now.tasks} tasks: {now.finished} finished, {now.failed} failed, {now.running} running, "
                  f"{now.pending} pending", highlight=False, soft_wrap=True)
    console.print(f"driver {now.driver}", highlight=False, soft_wrap=True)
    return 0


# --- views ---------------------------------------------------------------------------------

VIEW_EXAMPLES = {
    "figures": "examples:\n  layerlie figures out/ --out figs/",
    "report": ("examples:\n  layerlie report resnet18\n"
               "  layerlie report vit_tiny_patch16_224 --group rotate --n 4 --size 64 --out vit.html\n"
               "  layerlie report mynets:small --checkpoint trained.safetensors --out small.html\n"
               "  layerlie report resnet50 --pretrained --groups translate_x,rotate\n"
               "  layerlie report --store out/ --out report.html        # from an existing sweep"),
}


def _add_view_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="draw every paper figure of a store as PNG and PDF",
                       epilog=VIEW_EXAMPLES["figures"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="a sweep's store folder")
    p.add_argument("--out", default="figures", help="the folder to write into (default figures/)")

    p = sub.add_parser("report", help="one self-contained HTML report of a model",
                       epilog=VIEW_EXAMPLES["report"], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="timm name or package.module:callable (default: the store's first)")
    _add_weights_args(p)
    p.add_argument("--groups", default="all", help="groups of the end-to-end table and the metrics, "
                   "comma-separated names or all (default all): " + ", ".join(list_groups(compat=True)))
    p.add_argument("--group", default=None, help="the group of the layer table and the ablation (default translate_x)")
    p.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    p.add_argument("--store", help="render from this store when it holds the model; else sweep into it")
    p.add_argument("--images", help="folder of images; default: embedded photos")
    p.add_argument("--n", type=_positive, default=2, help="number of images (default 2)")
    _add_renamed(p, "--seed", "--init-seed", type=int, default=0, help="seed for random-init weights (default 0)")


def cmd_figures(args: argparse.Namespace) -> int:
    from layerlie.views.figures import render

    written, notes = render(args.store, args.out)
    for note in notes:
        print(f"layerlie: note: {note}", file=sys.stderr)
    console.print(f"wrote {len(written)} files to {args.out}", highlight=False, soft_wrap=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from layerlie.results import store
    from layerlie.views.report import render, report

    held = []
    if args.store and store.manifest(args.store) is not None:
        held = list(store.load(args.store, "e2e").get("model", pd.Series(dtype=str)).unique())
    if held and (args.model is None or args.model in held):
        out = render(args.store, args.out, model=args.model, group=args.group)
    elif args.model is None:
        raise LayerlieError("give a MODEL, e.g. layerlie report resnet18, or --store of a sweep that holds one")
    else:
        out = report(args.model, path=args.out, groups=args.groups, group=args.group or "translate_x",
                     checkpoint=args.checkpoint, pretrained=args.pretrained, n=args.n, size=args.size,
                     init_seed=args.init_seed, images=args.images, store=args.store)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
    return 0


# --- experiments ---------------------------------------------------------------------------

EXPERIMENT_EXAMPLES = ("examples:\n  layerlie experiment learned-equivariance                # the full grid, ~15 min\n"
                       "  layerlie experiment learned-equivariance --resume       # go on after a kill\n"
                       "  layerlie experiment learned-equivariance --tiny --store out/tiny --out tiny/\n"
                       "  layerlie experiment learned-equivariance --datasets digits --models resnet10t --steps 50")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _add_experiment_parser(sub: argparse._SubParsersAction) -> None:
    from layerlie.experiments.learned import CONDITIONS, DATASETS, MODELS

    p = sub.add_parser("experiment", help="train small models here and measure their equivariance along the way",
                       epilog=EXPERIMENT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["learned-equivariance"], help="the experiment")
    p.add_argument("--store", default="out/learned", help="the results store (default out/learned)")
    p.add_argument("--out", default="figures/learned", help="figures and SUMMARY.md (default figures/learned)")
    p.add_argument("--resume", action="store_true", help="skip the runs the store has finished")
    p.add_argument("--tiny", action="store_true", help="a few steps per run, small probes (a smoke test)")
    p.add_argument("--datasets", type=_names, help=f"comma-separated, from: {', '.join(DATASETS)} (default all)")
    p.add_argument("--models", type=_names, help=f"comma-separated, from: {', '.join(MODELS)} (default all)")
    p.add_argument("--conditions", type=_names,
                   help=f"comma-separated, from: {', '.join(CONDITIONS)} (default all)")
    p.add_argument("--steps", type=_positive, help="training steps per run (default 200; 4 with --tiny)")
    p.add_argument("--seed", type=int, help="seeds the split, weights, batches and augmentation (default 0)")


def cmd_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from layerlie.experiments.learned import FULL, TINY, experiment

    chosen = {k: getattr(args, k) for k in ("datasets", "models", "conditions", "steps", "seed")
              if getattr(args, k) is not None}
    config = dataclasses.replace(TINY if args.tiny else FULL, **chosen).check()
    result = experiment(args.store, args.out, config=config, resume=args.resume,
                        log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    console.print(f"{len(result.ran)} runs ran, {len(result.skipped)} skipped as done; store {result.store}; "
                  f"wrote {len(result.written)} files to {args.out}", highlight=False, soft_wrap=True)
    return 0

