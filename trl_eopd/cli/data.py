"""Training data for `trl-eopd train`: load a split (hub, folder or local file) and reshape it into `messages`."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .. import _compat
from .errors import UsageError
from .tiny_cache import resolve_tiny

_LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_split(name: str, config: str | None, split: str | None, *, trust_remote_code: bool = False):
    """One split of a hub dataset, a local dataset folder (`save_to_disk` or data files) or a local data file."""
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        builder = _LOCAL_DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"cannot read dataset file {name}: use one of {', '.join(sorted(_LOCAL_DATA_BUILDERS))}.")
        # Without the "Generating train split" bar, which a local file fills at once: a file that does not parse then
        # gets the one line below, alone.
        bars_were_off = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            # A local file has one split, whatever the recipe calls it.
            with _compat.datasets_json_errors_left_to_the_caller():
                return datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:
            raise UsageError(f"cannot read dataset file {name}: {_unreadable(path, builder, error)}") from None
        finally:
            if not bars_were_off:
                datasets.enable_progress_bars()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"dataset {name} has no split {split!r}; it has {', '.join(loaded)}.")
            return loaded[split]
        return loaded
    if not path.exists() and (name.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_DATA_BUILDERS):
        raise UsageError(f"dataset file {name} does not exist.")
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UsageError(f"dataset {name} has no split {split!r}: {e}") from None
        raise


def _unreadable(path: Path, builder: str, error: Exception) -> str:
    """Where and why `datasets` could not read a local file: for JSON, the first line that is not valid JSON."""
    if builder == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(text)
        except json.JSONDecodeError as whole:
            bad_line = _first_bad_json_line(text)
            # A `.json` file whose first line is already broken is taken as one (broken) document, not JSON lines.
            if bad_line is not None and not (bad_line[0] == 1 and path.suffix.lower() == ".json"):
                number, bad = bad_line
                return (
                    f"line {number} is not valid JSON ({bad.msg} at column {bad.colno}); each line must be one JSON "
                    "object."
                )
            return f"it is not valid JSON ({whole.msg} at line {whole.lineno}, column {whole.colno})."
    cause = error.__cause__ or error.__context__ or error
    return f"{type(cause).__name__}: {cause}"


def _first_bad_json_line(text: str) -> tuple[int, json.JSONDecodeError] | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as bad:
                return number, bad
    return None


def _is_turns(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value)


def _check_column(column: str, columns: list[str], option: str, name: str) -> None:
    if column not in columns:
        close = difflib.get_close_matches(column, columns, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"dataset {name} has no column {column!r} (set by {option}).{hint} Its columns are: {', '.join(columns)}."
        )


def to_messages(dataset, args, name: str, *, lmbda: float):
    """Bring a dataset to the single `messages` column GKD's collator reads, validating its columns.

    Other columns are dropped on purpose: GKD's collator treats a `prompt` column as an already formatted prompt
    string, which would silently bypass the chat template.
    """
    columns = list(dataset.column_names)
    use_messages = args.dataset_prompt_column is None and args.dataset_messages_column in columns
    if use_messages:
        source = ("messages", args.dataset_messages_column, None)
    else:
        prompt_col = args.dataset_prompt_column or "prompt"
        if prompt_col not in columns:
            if args.dataset_prompt_column is not None:
                _check_column(prompt_col, columns, "dataset_prompt_column", name)
            raise UsageError(
                f"dataset {name} has neither a {args.dataset_messages_column!r} column (chat turns ending with the "
                f"assistant's) nor a 'prompt' column; its columns are: {', '.join(columns)}. Point "
                "`dataset_messages_column` or `dataset_prompt_column` (and optionally `dataset_completion_column`) at "
                "the right ones, e.g. `dataset_prompt_column: problem` and `dataset_completion_column: solution` for "
                "MATH."
            )
        completion_col = args.dataset_completion_column
        if completion_col is not None:
            _check_column(completion_col, columns, "dataset_completion_column", name)
        elif "completion" in columns:
            completion_col = "completion"
        source = ("prompt", prompt_col, completion_col)

    prompt_only = source[0] == "prompt" and source[2] is None
    if prompt_only and lmbda < 1.0:
        raise UsageError(
            f"dataset {name} has prompts but no completions, so every batch must be generated by the student: set "
            f"`lmbda: 1.0` (got {lmbda}), or name a completion column with `dataset_completion_column`."
        )
    template, system = args.prompt_template, args.system_prompt

    def as_turns(value, role: str, column: str) -> list[dict]:
        if isinstance(value, str):
            if role == "user":
                value = template.replace("{prompt}", value)
            return [{"role": role, "content": value}]
        if _is_turns(value):
            return [{"role": t["role"], "content": t["content"]} for t in value]
        raise UsageError(
            f"column {column!r} of dataset {name} must hold strings or lists of {{role, content}} turns; got "
            f"{type(value).__name__}."
        )

    def convert(row):
        if source[0] == "messages":
            turns = as_turns(row[source[1]], "user", source[1])
            if not turns:
                raise UsageError(f"dataset {name} has an empty conversation in column {source[1]!r}.")
        else:
            turns = as_turns(row[source[1]], "user", source[1])
            if source[2] is not None:
                turns += as_turns(row[source[2]], "assistant", source[2])
        if turns[-1]["role"] != "assistant":
            # Prompt-only conversation: GKD's collator takes everything but the last turn as the prompt, so give it an
            # empty assistant turn; with lmbda = 1 the student's own sample replaces it before any loss is taken.
            if lmbda < 1.0:
                raise UsageError(
                    f"a conversation in dataset {name} does not end with an assistant turn, which is only allowed with "
                    f"`lmbda: 1.0` (got {lmbda})."
                )
            turns.append({"role": "assistant", "content": ""})
        if system is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        return {"messages": turns}

    # Fail on a bad first row now, with a clear message, rather than deep inside a worker during `map`.
    if len(dataset) > 0:
        convert(dataset[0])
    from ..collator import TEACHER_ID_COLUMN

    # Each row's served teacher (several teachers, `trl_eopd/teacher_routing.py`) is the one other column kept.
    dropped = [column for column in columns if column != TEACHER_ID_COLUMN]
    return dataset.map(convert, remove_columns=dropped, desc=f"Formatting {name}")


def load_datasets(script_args, training_args):
    """The training and (when asked for) evaluation datasets of a run, each as a `messages` column."""
    if script_args.dataset_streaming:
        raise UsageError(
            "`dataset_streaming: true` is not supported: EOPD trains from a dataset it can index (the token counts "
            "and the per-column checks read rows up front). Leave it false."
        )
    if not script_args.dataset_name:
        raise UsageError("no training data: set `dataset_name` (hub id, local folder or file, or `tiny://train`).")
    name = resolve_tiny(script_args.dataset_name)
    train = load_split(name, script_args.dataset_config, script_args.dataset_train_split)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if len(train) == 0:
        raise UsageError(f"dataset {script_args.dataset_name} has no rows to train on (check the split and filters).")
    train = to_messages(train, script_args, script_args.dataset_name, lmbda=training_args.lmbda)

    eval_dataset = None
    wants_eval = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if script_args.eval_dataset_name is not None:
        eval_name = resolve_tiny(script_args.eval_dataset_name)
        is_file = Path(eval_name).expanduser().is_file()
        split = script_args.eval_dataset_split or ("train" if is_file else "test")
        eval_dataset = load_split(eval_name, script_args.eval_dataset_config, split)
        eval_label = script_args.eval_dataset_name
    elif wants_eval:
        if Path(name).expanduser().is_file():
            raise UsageError(
                f"`eval_strategy` is {training_args.eval_strategy!r} but the training data is a single file; give the "
                "evaluation data with `eval_dataset_name`."
            )
        eval_dataset = load_split(name, script_args.dataset_config, script_args.dataset_test_split)
        eval_label = f"{script_args.dataset_name}[{script_args.dataset_test_split}]"
    if eval_dataset is not None:
        if script_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
        eval_dataset = to_messages(eval_dataset, script_args, eval_label, lmbda=training_args.lmbda)
    return train, eval_dataset
