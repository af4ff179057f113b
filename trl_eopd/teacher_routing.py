"""Several served teachers, one student: each row scored and gated by the teacher its `teacher_id` column names.

Multi-teacher on-policy distillation (MOPD, arXiv 2606.30406) with EOPD's gate (arXiv 2603.07079). With
`teacher_model_server_url` a mapping of teacher id to URL, every accumulation window's rows are split by teacher, each
teacher gets one request per process for its rows (the requests run concurrently, in threads), and each batch keeps
every teacher's log-probabilities with the loss positions they belong to ([`RoutedTeacherLogProbs`]). The loss is
then the served-teacher loss of each teacher's tokens, with that teacher's gate threshold, summed over the teachers
with the window's shared divisor: exactly the loss each row would get from a single-teacher run with its own teacher.
"""

from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from numbers import Real

import torch
from torch import Tensor

from .collator import TEACHER_ID_COLUMN
from .loss.served import ServedTeacherStats, served_teacher_eopd_loss_and_stats
from .teacher_server import IGNORE_INDEX, ServedTeacherLogProbs, TeacherServer, TeacherServerError

# The per-teacher metrics, `eopd/teacher/<id>/<name>`: the share each teacher gates, its entropy, what it adds to
# the loss and how often its gate rested on the estimate alone.
PER_TEACHER_METRICS = (
    "high_entropy_ratio",
    "teacher_entropy",
    "teacher_entropy_estimate",
    "gate_ambiguous_ratio",
    "loss_base",
    "loss_forward_gated",
    "forward_kl_top_k",
    "token_share",
)


def _parse_mapping(value, name: str):
    """A JSON object given as a string (the command line) becomes a dict; anything else is returned as is."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` is not a valid JSON object ({error.msg}); got {value!r}.") from None
    return value


def normalise_routing_options(args) -> None:
    """Turn the JSON forms of `teacher_model_server_url` and `teacher_entropy_thresholds` into dicts and check them,
    raising a `ValueError` naming the field and entry."""
    urls = _parse_mapping(args.teacher_model_server_url, "teacher_model_server_url")
    thresholds = _parse_mapping(args.teacher_entropy_thresholds, "teacher_entropy_thresholds")
    if isinstance(urls, dict):
        if not urls:
            raise ValueError("`teacher_model_server_url` is an empty mapping: give at least one teacher id and URL.")
        for teacher_id, url in urls.items():
            if not isinstance(teacher_id, str) or not teacher_id:
                raise ValueError(
                    f"`teacher_model_server_url` keys are teacher ids (non-empty strings); got {teacher_id!r}."
                )
            if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
                raise ValueError(
                    f"`teacher_model_server_url[{teacher_id!r}]` must be an http(s) base URL such as "
                    f"'http://10.0.0.3:8000'; got {url!r}."
                )
    if thresholds is not None:
        if not isinstance(urls, dict):
            raise ValueError(
                "`teacher_entropy_thresholds` needs `teacher_model_server_url` to be a mapping of teacher id to URL; "
                "with a single teacher, set `entropy_threshold`."
            )
        if not isinstance(thresholds, dict):
            raise ValueError(
                f"`teacher_entropy_thresholds` must be a mapping of teacher id to nats; got {thresholds!r}."
            )
        for teacher_id, threshold in thresholds.items():
            if teacher_id not in urls:
                raise ValueError(
                    f"`teacher_entropy_thresholds` names teacher {teacher_id!r}, which `teacher_model_server_url` "
                    f"does not; its teachers are {sorted(urls)}."
                )
            if isinstance(threshold, str):
                try:
                    threshold = float(threshold)
                except ValueError:
                    pass
            if (
                isinstance(threshold, bool)
                or not isinstance(threshold, Real)
                or math.isnan(threshold)
                or threshold < 0
            ):
                raise ValueError(
                    f"`teacher_entropy_thresholds[{teacher_id!r}]` must be a number of nats >= 0 (inf switches that "
                    f"teacher's gate off); got {threshold!r}."
                )
            thresholds[teacher_id] = float(threshold)
    args.teacher_model_server_url = urls
    args.teacher_entropy_thresholds = thresholds


@dataclass
class RoutedTeacherLogProbs:
    """A batch's served log-probabilities, per teacher: `groups[teacher_id] = (index, log_probs)`, where `index`
    `(n,)` holds the batch's loss positions (row-major over `labels[:, 1:] != -100`) that teacher scored, in order."""

    groups: dict[str, tuple[Tensor, ServedTeacherLogProbs]]

    def to(self, device) -> RoutedTeacherLogProbs:
        return RoutedTeacherLogProbs({t: (i.to(device), lp.to(device)) for t, (i, lp) in self.groups.items()})


class RoutedTeacherStats(ServedTeacherStats):
    """`ServedTeacherStats` of every token, plus each teacher's own in `per_teacher` (in the router's id order)."""

    per_teacher: dict[str, ServedTeacherStats]

    def to_tensor(self) -> Tensor:
        return torch.cat([super().to_tensor(), *(stats.to_tensor() for stats in self.per_teacher.values())])

    def means(self) -> dict[str, float]:
        means = super().means()
        total_tokens = max(float(self.num_tokens), 1.0)
        for teacher_id, stats in self.per_teacher.items():
            teacher_means = stats.means()
            teacher_means["eopd/token_share"] = float(stats.num_tokens) / total_tokens
            for name in PER_TEACHER_METRICS:
                if f"eopd/{name}" in teacher_means:
                    means[f"eopd/teacher/{teacher_id}/{name}"] = teacher_means[f"eopd/{name}"]
        return means


def _sum_stats(parts: list[ServedTeacherStats]) -> ServedTeacherStats:
    return ServedTeacherStats(*(sum(getattr(part, f.name) for part in parts) for f in fields(ServedTeacherStats)))


def _zero_stats(device) -> ServedTeacherStats:
    return ServedTeacherStats(*(torch.zeros((), device=device) for _ in fields(ServedTeacherStats)))


class RoutedStatsLayout:
    """What `EOPDTrainer` calls its stats class: rebuilds [`RoutedTeacherStats`] from their packed sums."""

    def __init__(self, teacher_ids: list[str]):
        self.teacher_ids = list(teacher_ids)

    def from_tensor(self, packed: Tensor) -> RoutedTeacherStats:
        width = len(fields(ServedTeacherStats))
        parts = packed.split(width, dim=-1)
        stats = RoutedTeacherStats.__new__(RoutedTeacherStats)
        stats.__init__(*parts[0].unbind(-1))
        stats.per_teacher = {t: ServedTeacherStats.from_tensor(part) for t, part in zip(self.teacher_ids, parts[1:])}
        return stats


def routed_teacher_eopd_loss_and_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    routed: RoutedTeacherLogProbs,
    *,
    teacher_ids: list[str],
    options,
    entropy_thresholds: dict[str, float] | None = None,
    num_items_in_batch=None,
    target_log_probs_out: Tensor | None = None,
    importance=None,
    **loss_kwargs,
) -> tuple[Tensor, RoutedTeacherStats]:
    """[`served_teacher_eopd_loss_and_stats`] of each teacher's tokens, with its threshold, summed over teachers.

    Every group is divided by the same divisor (the window's token count, or this batch's when none is given), so the
    sum is the loss a single call would give if every token's teacher and gate threshold were its own.
    `loss_kwargs` go to each call unchanged (the student's bias, scale and softcap, the vocabulary size, the entropy
    estimate, the chunk size). `importance` (stale rollouts' sampler log-probs, one per loss token) and
    `target_log_probs_out` are split by the same token index as the teacher groups.
    """
    thresholds = entropy_thresholds or {}
    divisor = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    loss, per_teacher = None, {}
    for teacher_id, (index, served) in routed.groups.items():
        index = index.to(student_hidden.device)
        out = None if target_log_probs_out is None else target_log_probs_out.new_empty(index.numel())
        threshold = thresholds.get(teacher_id, options.entropy_threshold)
        group_importance = (
            None
            if importance is None
            else dataclasses.replace(
                importance,
                sampler_log_probs=importance.sampler_log_probs[index.to(importance.sampler_log_probs.device)],
            )
        )
        part, stats = served_teacher_eopd_loss_and_stats(
            student_hidden[index],
            student_weight,
            targets[index],
            served.top_log_probs,
            served.top_ids,
            served.target_log_probs,
            teacher_entropy=served.entropy,
            options=options.replace(entropy_threshold=threshold),
            num_items_in_batch=divisor,
            target_log_probs_out=out,
            importance=group_importance,
            **loss_kwargs,
        )
        if out is not None:
            target_log_probs_out[index] = out
        loss = part if loss is None else loss + part
        per_teacher[teacher_id] = stats
    device = student_hidden.device
    ordered = {t: per_teacher.get(t) or _zero_stats(device) for t in teacher_ids}
    total = _sum_stats(list(per_teacher.values()))
    stats = RoutedTeacherStats.__new__(RoutedTeacherStats)
    stats.__init__(*(getattr(total, f.name) for f in fields(ServedTeacherStats)))
    stats.per_teacher = ordered
    return loss, stats


class TeacherRouter:
    """Several [`TeacherServer`]s, one per teacher id, each checked at construction; routes rows by `teacher_id`.

    A check that fails names the teacher id and its URL. The interface the trainer uses is [`TeacherServer`]'s:
    `fetch(batches, global_step)` (one result per batch, here a [`RoutedTeacherLogProbs`]), `vocab_size`, `close()`.
    """

    def __init__(self, urls: dict[str, str], *, entropy_thresholds: dict[str, float] | None = None,
                 datasets: dict | None = None, **server_kwargs):  # fmt: skip
        self.teacher_ids = list(urls)
        self.entropy_thresholds = dict(entropy_thresholds or {})
        self.servers: dict[str, TeacherServer] = {}
        # The data first: a misrouted row is found in seconds, a server that is down only after the timeout.
        for name, dataset in (datasets or {}).items():
            self.check_dataset(dataset, name)
        # `teacher_model` names one model; compared with several served ones it would only warn about the others.
        server_kwargs.pop("teacher_name", None)
        for teacher_id, url in urls.items():
            try:
                self.servers[teacher_id] = TeacherServer(url, **server_kwargs)
            except TeacherServerError as error:
                self.close()
                raise TeacherServerError(f"Teacher {teacher_id!r} (`teacher_model_server_url`): {error}") from None
        self.vocab_size = next(iter(self.servers.values())).vocab_size

    @property
    def url(self) -> str:
        """Every teacher's id and URL, for messages."""
        return ", ".join(f"{teacher_id}: {server.url}" for teacher_id, server in self.servers.items())

    def check_dataset(self, dataset, name: str) -> None:
        """Stop before training on a row whose `teacher_id` is not a configured teacher, naming it and the ids.

        A map-style dataset is read a column at a time; a stream is checked on its first row (later rows are checked
        as they are fetched). Without the column, every row goes to the only teacher; with two or more, it is an error.
        """
        if dataset is None:
            return
        if isinstance(dataset, dict):
            for key, split in dataset.items():
                self.check_dataset(split, f"{name}[{key!r}]")
            return
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            first = next(iter(dataset.take(1)), None) if callable(getattr(dataset, "take", None)) else None
            columns = list(first) if isinstance(first, dict) else None
        if columns is not None and TEACHER_ID_COLUMN not in columns:
            self._missing_column(f"`{name}` (columns {sorted(columns)})")
            return
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            values = dataset[TEACHER_ID_COLUMN]
        elif callable(getattr(dataset, "take", None)):
            values = [row.get(TEACHER_ID_COLUMN) for row in dataset.take(1)]
        else:
            return
        for row, value in enumerate(values):
            if value not in self.teacher_ids:
                raise ValueError(self._unknown(value, f"Row {row} of `{name}`"))

    def _missing_column(self, where: str) -> None:
        if len(self.teacher_ids) > 1:
            raise ValueError(
                f"{where} has no `{TEACHER_ID_COLUMN}` column, which `teacher_model_server_url` with "
                f"{len(self.teacher_ids)} teachers ({', '.join(map(repr, self.teacher_ids))}) needs to pick each row's "
                "teacher."
            )

    def _unknown(self, value, where: str) -> str:
        return (
            f"{where} has `{TEACHER_ID_COLUMN}={value!r}`, which is not a teacher of `teacher_model_server_url`; "
            f"the known ids are {self.teacher_ids}."
        )

    def _row_teachers(self, batch: dict, global_step: int) -> list[str]:
        rows = batch["input_ids"].size(0)
        ids = batch.get(TEACHER_ID_COLUMN)
        if ids is None:
            self._missing_column("A training batch")
            return [self.teacher_ids[0]] * rows
        for value in ids:
            if value not in self.teacher_ids:
                raise ValueError(self._unknown(value, f"A row of the batch at global step {global_step}"))
        return list(ids)

    def fetch(self, batches: list[dict], global_step: int) -> list[RoutedTeacherLogProbs]:
        """One request per teacher for its rows of `batches`, all teachers at once; one result per batch."""
        plans, requests = [], {}
        for batch_index, batch in enumerate(batches):
            row_teachers = self._row_teachers(batch, global_step)
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            starts = [sum(counts[:row]) for row in range(len(counts))]
            plan = {}
            for teacher_id in self.teacher_ids:
                rows = [row for row, t in enumerate(row_teachers) if t == teacher_id]
                if not rows:
                    continue
                index = [position for row in rows for position in range(starts[row], starts[row] + counts[row])]
                plan[teacher_id] = torch.tensor(index, dtype=torch.long)
                selected = torch.tensor(rows, device=batch["input_ids"].device)
                sub_batch = {key: batch[key][selected] for key in ("input_ids", "attention_mask", "labels")}
                requests.setdefault(teacher_id, []).append((batch_index, sub_batch))
            plans.append(plan)
        if not requests:
            return [RoutedTeacherLogProbs({}) for _ in batches]
        # Threads suffice: the requests wait on the network, and `requests` releases the GIL while they do.
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = {
                teacher_id: pool.submit(self.servers[teacher_id].fetch, [sub for _, sub in items], global_step)
                for teacher_id, items in requests.items()
            }
            answers = {teacher_id: future.result() for teacher_id, future in futures.items()}
        results = [RoutedTeacherLogProbs({}) for _ in batches]
        for teacher_id, items in requests.items():
            for (batch_index, _), log_probs in zip(items, answers[teacher_id], strict=True):
                results[batch_index].groups[teacher_id] = (plans[batch_index][teacher_id], log_probs)
        return results

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def connect_served_teachers(args, *, student_vocab_size: int, teacher_name: str | None, datasets: dict):
    """The client of `args.teacher_model_server_url` (one URL, or a mapping of teacher id to URL, each row routed by
    its `teacher_id`), checked against its servers, and the statistics class its loss returns."""
    server_kwargs = {
        "top_logprobs": args.teacher_top_logprobs,
        "timeout": args.teacher_model_server_timeout,
        "retries": args.teacher_model_server_retries,
        "student_vocab_size": student_vocab_size,
        "teacher_name": teacher_name,
    }
    urls = args.teacher_model_server_url
    if isinstance(urls, dict):  # several teachers, each row routed to its own
        router = TeacherRouter(urls, entropy_thresholds=args.teacher_entropy_thresholds, datasets=datasets,
                               **server_kwargs)  # fmt: skip
        return router, RoutedStatsLayout(router.teacher_ids)
    from . import teacher_server  # looked up at call time, so a test can stand a local teacher in for the client

    return teacher_server.TeacherServer(urls, **server_kwargs), ServedTeacherStats
