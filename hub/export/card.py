"""Model cards: `model_cards/<family>/README.md` (YAML front matter + Jinja body) rendered per repo."""

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCardData

from hub.errors import RepoError
from hub.models import Family

# The source tree (editable installs) first, then where a wheel installs the templates.
TEMPLATE_ROOTS = (
    Path(__file__).resolve().parents[2] / "model_cards",
    Path(sysconfig.get_path("data")) / "share" / "medhub" / "model_cards",
)

MODALITY_NAMES = {"xray": "X-ray", "ct": "CT", "mri": "MRI", "pathology": "pathology", "text": "radiology report"}


@dataclass
class CardFacts:
    """Everything a card says about one repo beyond the family template's constants."""

    variant: str
    repo_id: str
    modality: str
    license: str
    source_text: str
    training_data: str
    base_model: str | None = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)


def render_card(
    family: Family, facts: CardFacts, config: Any, preprocessing: dict[str, Any], num_parameters: int
) -> str:
    """The README.md of a repo: merged front matter (valid for `ModelCard`) and the family's body."""
    candidates = [root / family.model_type / "README.md" for root in TEMPLATE_ROOTS]
    template_path = next((path for path in candidates if path.is_file()), None)
    if template_path is None:
        raise RepoError(f"no model card template for {family.model_type} in {' or '.join(map(str, TEMPLATE_ROOTS))}")
    _, front_text, body_template = template_path.read_text().split("---\n", 2)
    front = yaml.safe_load(front_text)
    front["tags"] = sorted(set(front["tags"]) | {facts.modality})
    data = ModelCardData(
        license=facts.license,
        base_model=facts.base_model,
        model_name=facts.variant,
        eval_results=[EvalResult(**result) for result in facts.eval_results] or None,
        **front,
    )
    body = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(body_template)
    text = body.render(
        variant=facts.variant,
        repo_id=facts.repo_id,
        modality_name=MODALITY_NAMES.get(facts.modality, facts.modality),
        num_parameters=f"{num_parameters:,}",
        source_text=facts.source_text,
        training_data=facts.training_data,
        preprocessing_json=json.dumps(preprocessing, indent=2, sort_keys=True),
        eval_table=_eval_table(facts.eval_results),
        **family.card_context(config),
    )
    return f"---\n{data.to_yaml()}\n---\n{text}"


def _eval_table(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    rows = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    rows += [
        f"| {r['task_type']} | {r['dataset_name']} | {r['metric_type']} | {r['metric_value']:.4g} |" for r in results
    ]
    return "\n".join(rows)


EVALUATION_SOURCE = "medhub evaluate"
MANIFEST_DATASET = "medhub-manifest"  # the dataset_type of results measured on a medhub manifest
_SECTION_START, _SECTION_END = "<!-- medhub-evaluate:start -->", "<!-- medhub-evaluate:end -->"


def with_evaluation(card_text: str, results: list[EvalResult], table: str, model_name: str) -> str:
    """`card_text` with `results` in its model-index (named `model_name` where the card names no model) and
    `table` as its transfer-evaluation section.

    Earlier entries on a medhub manifest for the same task names are replaced (other results are kept), and the
    section between the medhub-evaluate markers is rewritten, so updating twice does not repeat anything.
    """
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    names = {result.task_name for result in results}
    kept = [
        r for r in card.data.eval_results or [] if not (r.dataset_type == MANIFEST_DATASET and r.task_name in names)
    ]
    card.data.eval_results = kept + results
    if not card.data.model_name:
        card.data.model_name = model_name
    section = f"{_SECTION_START}\n## Transfer evaluation ({EVALUATION_SOURCE})\n\n{table}\n{_SECTION_END}"
    body = card.text
    if _SECTION_START in body and _SECTION_END in body:
        head, rest = body.split(_SECTION_START, 1)
        body = head + section + rest.split(_SECTION_END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    return f"---\n{card.data.to_yaml()}\n---\n{body}"
