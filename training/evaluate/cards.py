"""`--update-cards`: each backbone's study results written into its repo's card (model-index entries and a
markdown table), published as a new revision: a repo from the Hugging Face cache gets a new commit there
(`install_in_cache`, the older commits stay loadable by sha); a folder repo is copied to DIR/cards/<backbone>
with the new card and fresh checksums (the source folder is left as it was)."""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult

from hub.export import install_in_cache, resolve_repo, write_checksums
from hub.export.card import MANIFEST_DATASET, with_evaluation

from .report import METRIC_NAMES, format_p
from .stats import Summary
from .study import Study
from .units import GENERATED, backbone_repo

TASK_TYPES = {"classification": "image-classification", "segmentation": "image-segmentation"}


@dataclass
class CardUpdate:
    backbone: str
    location: Path
    commit: str | None  # the new cache commit; None for a folder repo


def _std(summary: Summary) -> str:
    return "n/a" if math.isnan(summary.std) else f"{summary.std:.4f}"


def eval_results(study: Study, summaries: list[Summary]) -> list[EvalResult]:
    """One model-index entry per (task, protocol, label fraction): the mean over runs, the rest in its names."""
    results = []
    for s in summaries:
        task = study.tasks[s.task]
        runs = f"{s.runs} runs, identical" if s.identical else f"{s.runs} runs"
        results.append(
            EvalResult(
                task_type=TASK_TYPES[task.kind],
                task_name=s.task,
                dataset_type=MANIFEST_DATASET,
                dataset_name=task.manifest.name,
                dataset_split="test",
                metric_type=s.metric,
                metric_value=s.mean,
                metric_name=(
                    f"{METRIC_NAMES.get(s.metric, s.metric)}, {s.protocol} @ {s.fraction:g} labels "
                    f"(mean of {runs}, sample std {_std(s)}, p vs {study.baseline} {format_p(s.p_student)})"
                ),
            )
        )
    return results


def results_table(study: Study, summaries: list[Summary]) -> str:
    lines = [
        (
            f"Test-split results of `medhub evaluate` (mean +- sample std over runs; p: Student's t-test against "
            f"`{study.baseline}`)."
        ),
        "",
        "| task | dataset | protocol | labels | metric | mean | std | runs | p |",
        "|---" * 9 + "|",
    ]
    for s in summaries:
        runs = f"{s.runs} (identical)" if s.identical else str(s.runs)
        lines.append(
            f"| {s.task} | {study.tasks[s.task].manifest.name} | {s.protocol} | {s.fraction:g} | "
            f"{METRIC_NAMES.get(s.metric, s.metric)} | {s.mean:.4f} | {_std(s)} | {runs} | "
            f"{format_p(s.p_student)} |"
        )
    return "\n".join(lines)


def _rewrite(source: Path, target: Path, card: str) -> None:
    """A copy of repo `source` (links followed) at `target` with README.md = `card` and fresh checksums."""
    shutil.copytree(source, target, symlinks=False, ignore=shutil.ignore_patterns(".cache"))
    (target / "README.md").write_text(card, encoding="utf-8")
    write_checksums(target)


def update_cards(study: Study, summaries: list[Summary], out: Path) -> list[CardUpdate]:
    updates = []
    for backbone, source in study.backbones.items():
        own = [s for s in summaries if s.backbone == backbone]
        if not own:
            continue
        is_folder = source.startswith(GENERATED) or Path(source).is_dir()
        repo = backbone_repo(source, out / "backbones") if is_folder else resolve_repo(source)
        readme = repo / "README.md"
        card = with_evaluation(
            readme.read_text(encoding="utf-8") if readme.is_file() else "",
            eval_results(study, own),
            results_table(study, own),
            backbone,
        )
        if is_folder:
            target = out / "cards" / backbone
            if target.exists():
                shutil.rmtree(target)
            _rewrite(repo, target, card)
            updates.append(CardUpdate(backbone, target, None))
            continue
        with tempfile.TemporaryDirectory(dir=out) as staging:
            _rewrite(repo, Path(staging) / "repo", card)
            # the snapshot lies at <cache>/models--ORG--NAME/snapshots/<commit>: publish into that same cache
            published = install_in_cache(Path(staging) / "repo", source, repo.resolve().parents[2])
        updates.append(CardUpdate(backbone, Path(published.location), published.commit))
    return updates
