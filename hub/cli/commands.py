"""The hub's own subcommands: models, init, export, publish, verify, convert, phantoms."""

import argparse
import json
from pathlib import Path

from hub.catalogue import VARIANTS, get_variant
from hub.convert import CONVERTERS
from hub.data import generate
from hub.errors import InputError, RepoError
from hub.export import (
    Provenance,
    export_repo,
    export_variant,
    install_in_cache,
    random_init,
    resolve_repo,
    validate_repo_id,
    verify_repo,
)
from hub.export.publish import upload_plan, upload_to_hub
from hub.export.resolve import read_config
from hub.models import get_family
from hub.processing.processor import MedicalImageProcessor

PHANTOM_KINDS = ("xray", "ct", "mri", "pathology")


def register(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="list the catalogue of variants")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(handler=cmd_models)

    init = subparsers.add_parser("init", help="write a randomly initialised repo of a catalogue variant")
    init.add_argument("variant")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--repo-id", help="ORG/NAME shown in the card's loading examples")
    init.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    init.set_defaults(handler=cmd_init)

    export = subparsers.add_parser("export", help="turn a save_pretrained folder of a medhub model into a repo")
    export.add_argument("model_dir", type=Path)
    export.add_argument("--variant", required=True, help="catalogue variant the model was built from")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--repo-id")
    export.add_argument("--description", default=None, help="one line on how the weights were made")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=cmd_export)

    publish = subparsers.add_parser("publish", help="install a repo in the local HF cache or upload it to the Hub")
    publish.add_argument("repo_dir", type=Path)
    publish.add_argument("--repo-id", required=True)
    target = publish.add_mutually_exclusive_group(required=True)
    target.add_argument("--cache", action="store_true", help="install into the Hugging Face cache (offline)")
    target.add_argument("--hub", action="store_true", help="upload with huggingface_hub (token and network)")
    publish.add_argument("--cache-dir", type=Path, help="cache folder (default: HF_HUB_CACHE / HF_HOME/hub)")
    publish.add_argument("--revision", default="main")
    publish.add_argument("--private", action="store_true")
    publish.add_argument("--token")
    publish.add_argument("--dry-run", action="store_true", help="print what would be published and stop")
    publish.set_defaults(handler=cmd_publish)

    verify = subparsers.add_parser("verify", help="check a repo's checksums and golden output")
    verify.add_argument("repo", help="repo folder or ORG/NAME")
    verify.add_argument("--revision")
    verify.set_defaults(handler=cmd_verify)

    phantoms = subparsers.add_parser("phantoms", help="write a synthetic sample dataset and its manifest.jsonl")
    phantoms.add_argument("--out", type=Path, required=True)
    phantoms.add_argument(
        "--kinds", default=",".join(PHANTOM_KINDS), help=f"comma-separated subset of {','.join(PHANTOM_KINDS)}"
    )
    phantoms.add_argument("--count", type=int, help="phantoms per kind (default: 8 X-rays, 2 CT, 2 MRI, 4 pathology)")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--no-progress", action="store_true")
    phantoms.set_defaults(handler=cmd_phantoms)

    convert = subparsers.add_parser("convert", help="convert an upstream checkpoint into a repo")
    sources = convert.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for converter in CONVERTERS.values():
        source = sources.add_parser(converter.name, help=converter.help)
        source.add_argument("checkpoint", type=Path)
        source.add_argument("--out", type=Path, required=True)
        source.add_argument("--repo-id")
        source.add_argument("--license", default=converter.default_license, help="licence of the upstream weights")
        source.add_argument("--base-model", help="Hub id of the upstream model, for the card")
        source.add_argument("--overwrite", action="store_true")
        if converter.add_arguments is not None:
            converter.add_arguments(source)
        source.set_defaults(handler=cmd_convert, converter=converter)


def cmd_models(args: argparse.Namespace) -> int:
    rows = [
        {
            "variant": v.id,
            "family": v.family,
            "modality": v.modality,
            "dims": f"{v.spatial_dims}D",
            "tiny": v.tiny,
            "paper": v.paper,
            "upstream weights": v.upstream_weights,
        }
        for v in VARIANTS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["variant", "family", "modality", "dims", "paper", "upstream weights"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    variant = get_variant(args.variant)
    if args.repo_id:
        validate_repo_id(args.repo_id)
    model, provenance = random_init(variant, args.seed)
    out = export_variant(model, args.out, variant, provenance, repo_id=args.repo_id, overwrite=args.overwrite)
    print(f"wrote {variant.id} ({model.num_parameters():,} parameters) to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    variant = get_variant(args.variant)
    model_dir = args.model_dir
    if not (model_dir / "config.json").is_file():
        raise RepoError(f"model folder {model_dir} has no config.json")
    config = read_config(model_dir)
    family = get_family(config.get("model_type", ""))
    classes = {cls.__name__: cls for cls in family.auto_classes.values()}
    architecture = (config.get("architectures") or [family.encoder_class.__name__])[0]
    if architecture not in classes:
        raise RepoError(f"{model_dir} holds a {architecture}, which is not a {family.model_type} model class")
    model = classes[architecture].from_pretrained(model_dir)
    if (model_dir / "preprocessor_config.json").is_file():
        processor = MedicalImageProcessor.from_pretrained(model_dir)
    else:
        processor = variant.build_processor()
    provenance = Provenance(
        kind="trained",
        description=args.description or f"exported from `{model_dir.name}`",
        training_data="See the training run that produced these weights.",
    )
    out = export_repo(
        model,
        args.out,
        variant=variant.id,
        provenance=provenance,
        processor=processor,
        modality=variant.modality,
        repo_id=args.repo_id,
        overwrite=args.overwrite,
    )
    print(f"exported {architecture} to {out}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    validate_repo_id(args.repo_id)
    repo_dir = resolve_repo(args.repo_dir) if args.repo_dir.is_dir() else None
    if repo_dir is None:
        raise RepoError(f"repo folder {args.repo_dir} does not exist")
    if args.dry_run:
        where = "the Hub" if args.hub else "the local cache"
        print(f"would publish {repo_dir} to {where} as {args.repo_id}@{args.revision}:")
        for name, size in upload_plan(repo_dir):
            print(f"  {name}  {size:,} bytes")
        return 0
    if args.hub:
        published = upload_to_hub(
            repo_dir, args.repo_id, revision=args.revision, private=args.private, token=args.token
        )
    else:
        published = install_in_cache(repo_dir, args.repo_id, args.cache_dir, args.revision)
    print(f"published {published.repo_id}@{published.revision} commit {published.commit} at {published.location}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_repo(args.repo, args.revision)
    print(
        f"ok: {report.files_checked} files match checksums.sha256; golden "
        f"output within {report.golden_max_abs_diff:.2g} ({report.repo_dir})"
    )
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(PHANTOM_KINDS))
    if unknown or not kinds:
        raise InputError(
            f"--kinds {args.kinds!r} names no known phantom kind; expected "
            f"a comma-separated subset of {','.join(PHANTOM_KINDS)}"
        )
    if args.count is not None and args.count < 1:
        raise InputError(f"--count must be a positive number of phantoms per kind, got {args.count}")
    counts = {
        f"n_{kind}": (args.count if args.count is not None else None) if kind in kinds else 0 for kind in PHANTOM_KINDS
    }
    manifest = generate(
        args.out,
        seed=args.seed,
        progress=not args.no_progress,
        **{name: n for name, n in counts.items() if n is not None},
    )
    print(f"wrote {', '.join(kinds)} phantoms and {manifest}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.repo_id:
        validate_repo_id(args.repo_id)
    out = args.converter.run(args)
    print(f"converted {args.checkpoint} to {out}")
    return 0
