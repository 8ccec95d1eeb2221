"""MedCoSS's rehearsal: the k-means buffer, intra-modal mixup and feature distillation from the frozen teacher."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from hub.models.medcoss import MedCossForPreTraining, MedCossModel
from hub.models.medcoss.modeling_medcoss import random_masking


def kmeans(
    features: torch.Tensor, clusters: int, generator: torch.Generator, iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding drawn from `generator`: (centres (k, dim), assignment (N,))."""
    features = features.double()
    first = int(torch.randint(len(features), (1,), generator=generator))
    centres = [features[first]]
    for _ in range(1, clusters):
        distance = torch.cdist(features, torch.stack(centres)).min(dim=1).values ** 2
        weights = distance if float(distance.sum()) > 0 else torch.ones_like(distance)
        centres.append(features[int(torch.multinomial(weights, 1, generator=generator))])
    centres = torch.stack(centres)
    assignment = torch.cdist(features, centres).argmin(dim=1)
    for _ in range(iterations):
        for cluster in range(clusters):
            members = assignment == cluster
            if members.any():
                centres[cluster] = features[members].mean(dim=0)
        updated = torch.cdist(features, centres).argmin(dim=1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return centres, assignment


def kmeans_buffer(
    features: torch.Tensor, buffer_ratio: float, center_ratio: float, seed: int, iterations: int = 100
) -> list[int]:
    """Indices of the rehearsal buffer (MedCoSS's `main_buffer_kmean`): int(N * center_ratio) clusters (at least
    1), and from each the int(N * buffer_ratio // clusters) members (at least 1) nearest its centre; sorted."""
    count = len(features)
    clusters = min(count, max(1, int(count * center_ratio)))
    per_cluster = max(1, int(count * buffer_ratio // clusters))
    centres, assignment = kmeans(features, clusters, torch.Generator().manual_seed(seed), iterations)
    distance = torch.cdist(features.double(), centres)
    chosen: list[int] = []
    for cluster in range(clusters):
        members = torch.nonzero(assignment == cluster).flatten()
        order = distance[members, cluster].argsort(stable=True)
        chosen.extend(members[order[:per_cluster]].tolist())
    return sorted(chosen)


def image_mixup(
    pixel_values: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x <- lambda * x + (1 - lambda) * x[perm] with one lambda ~ U(0, 1) per sample and a permutation inside the
    (single-modality) batch. Returns (mixed, lambdas, permutation)."""
    batch = pixel_values.shape[0]
    lambdas = torch.rand(batch, generator=generator).to(pixel_values.device, pixel_values.dtype)
    permutation = torch.randperm(batch, generator=generator).to(pixel_values.device)
    shape = (batch,) + (1,) * (pixel_values.ndim - 1)
    mixed = lambdas.view(shape) * pixel_values + (1 - lambdas.view(shape)) * pixel_values[permutation]
    return mixed, lambdas, permutation


def text_mixup(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level binary mix: one ratio r ~ U(0, 1) per batch, each token kept with probability r, else taken from
    the permuted sample at the same position; attention masks mixed the same way. Returns (ids, mask, kept)."""
    ratio = float(torch.rand((), generator=generator))
    permutation = torch.randperm(input_ids.shape[0], generator=generator).to(input_ids.device)
    kept = (torch.rand(input_ids.shape, generator=generator) < ratio).to(input_ids.device)
    ids = torch.where(kept, input_ids, input_ids[permutation])
    mask = torch.where(kept, attention_mask, attention_mask[permutation])
    return ids, mask, kept


def teacher_image_tokens(
    teacher: MedCossModel, pixel_values: torch.Tensor, noise: torch.Tensor, mask_ratio: float
) -> torch.Tensor:
    """The teacher's final tokens (cls + visible patches) under the MAE masking chosen by `noise`."""
    tokens = teacher.image_embeddings(pixel_values)
    kept, _, _ = random_masking(tokens, mask_ratio, noise)
    return teacher.encoder(teacher.prepend_cls(kept))[-1]


def distillation_loss(
    student: MedCossForPreTraining,
    teacher: MedCossModel,
    batch: dict[str, torch.Tensor],
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE (mean over all elements) between student and frozen-teacher final tokens. Images: both see the same
    masking `noise` (batch, patches), so the same patches are kept; text: all positions of the same input."""
    with torch.no_grad():
        if "pixel_values" in batch:
            target = teacher_image_tokens(teacher, batch["pixel_values"], noise, student.config.mask_ratio)
        else:
            target = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if "pixel_values" in batch:
        output = student(pixel_values=batch["pixel_values"], noise=noise)
    else:
        output = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.mse_loss(output.last_hidden_state.float(), target.float())
