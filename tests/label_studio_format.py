"""Label Studio's import format, written down from its documentation and its import code, to check
what `shelfsight review export` writes against it (not against itself).

Sources (HumanSignal/label-studio):
- Task format: https://labelstud.io/guide/task_format ("Label Studio JSON format of annotated
  tasks"): a task is an object with `data` (object), optional `id`, `meta`, `annotations` and
  `predictions` (lists); each annotation or prediction has a `result` list; a result item has
  `from_name`, `to_name`, `type`, `value` (for choices: `value.choices`, a list of strings).
- Pre-annotations: https://labelstud.io/guide/predictions (docs/source/guide/predictions.md):
  `predictions[].result`, `model_version`, `score`; distinct ids for result items.
- Import validation: label_studio/tasks/validation.py (TaskValidator): `data` must hold every key
  an object tag's `value="$key"` names, of the tag's type (Image: str or list; Header: str, int
  or float); `annotations`/`predictions` must be lists of objects with a `result` list.
- Prediction validation: label_studio/tests/test_prediction_validation.py (ImportApiSerializer
  with LabelInterface.validate_prediction): `score` a number in [0.00, 1.00], `model_version` a
  string; each result's from_name must be a control tag of the config, to_name the object tag
  it points to, type the control's type ("choices" for <Choices>).
- Tags: https://labelstud.io/tags/choices (name, toName, choice = single | single-radio |
  multiple; <Choice value>), https://labelstud.io/tags/image (name, value="$key").
- Cloud storage: data.image may be an s3:// URI when an S3 source storage is connected
  (https://labelstud.io/guide/storage); otherwise it must be an http(s) URL Label Studio loads.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

OBJECT_TAG_TYPES: dict[str, tuple[type, ...]] = {  # TaskValidator's _DATA_TYPES for the tags we use
    "Image": (str, list), "Header": (str, int, float), "Text": (str, int, float, list),
}
CONTROL_TAGS = {"Choices": "choices"}  # tag -> result type
TASK_KEYS = {"id", "data", "meta", "annotations", "predictions"}
PREDICTION_KEYS = {"result", "score", "model_version", "id", "created_ago"}
RESULT_KEYS = {"id", "from_name", "to_name", "type", "value", "score", "origin", "readonly", "hidden"}
IMAGE_SCHEMES = {"http", "https", "s3", "gs", "azure-blob"}


@dataclass
class ParsedConfig:
    objects: dict[str, tuple[str, str | None]]  # name -> (tag, $data key or None)
    controls: dict[str, dict[str, Any]]  # name -> {"tag", "to_name", "choices", "choice"}


def parse_config(xml: str) -> tuple[ParsedConfig, list[str]]:
    """The labeling config's object and control tags, and every problem found in it."""
    errors: list[str] = []
    root = ET.fromstring(xml)  # noqa: S314 - configs this project generated
    if root.tag != "View":
        errors.append(f"root tag is {root.tag}, not View")
    objects: dict[str, tuple[str, str | None]] = {}
    controls: dict[str, dict[str, Any]] = {}
    for element in root.iter():
        if element.tag in OBJECT_TAG_TYPES:
            value = element.get("value", "")
            key = value[1:] if value.startswith("$") else None
            name = element.get("name")
            if element.tag != "Header":  # Header is visual: no name required
                if not name:
                    errors.append(f"<{element.tag}> without a name")
                elif name in objects or name in controls:
                    errors.append(f"duplicate tag name {name!r}")
            objects[name or f"#header{len(objects)}"] = (element.tag, key)
        elif element.tag in CONTROL_TAGS:
            name, to_name = element.get("name"), element.get("toName")
            if not name or not to_name:
                errors.append(f"<{element.tag}> needs name and toName")
                continue
            if name in controls or name in objects:
                errors.append(f"duplicate tag name {name!r}")
            choice = element.get("choice", "single")
            if choice not in {"single", "single-radio", "multiple"}:
                errors.append(f"{name}: choice={choice!r}")
            values = [c.get("value") for c in element.findall("Choice")]
            if not values or any(not v for v in values):
                errors.append(f"{name}: every <Choice> needs a value, and there must be one")
            if len(set(values)) != len(values):
                errors.append(f"{name}: duplicate choice values")
            controls[name] = {"tag": element.tag, "to_name": to_name, "choices": values, "choice": choice}
    for name, control in controls.items():
        if control["to_name"] not in objects:
            errors.append(f"{name}: toName {control['to_name']!r} is not an object tag")
    return ParsedConfig(objects, controls), errors


def _check_result(where: str, item: Any, config: ParsedConfig, ids: set[str]) -> list[str]:
    if not isinstance(item, dict):
        return [f"{where}: result item is not an object"]
    errors = [f"{where}: missing {k!r}" for k in ("from_name", "to_name", "type", "value") if k not in item]
    errors += [f"{where}: unexpected key {k!r}" for k in set(item) - RESULT_KEYS]
    if errors:
        return errors
    control = config.controls.get(item["from_name"])
    if control is None:
        return [f"{where}: from_name {item['from_name']!r} not found in the labeling config"]
    if item["to_name"] != control["to_name"]:
        errors.append(f"{where}: to_name {item['to_name']!r} is not {control['to_name']!r}")
    if item["type"] != CONTROL_TAGS[control["tag"]]:
        errors.append(f"{where}: type {item['type']!r} does not match expected type {CONTROL_TAGS[control['tag']]!r}")
    choices = item["value"].get("choices") if isinstance(item["value"], dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        errors.append(f"{where}: value.choices must be a list of strings")
    else:
        errors += [f"{where}: choice {c!r} is not a <Choice> of {item['from_name']}" for c in choices
                   if c not in control["choices"]]
        if control["choice"] != "multiple" and len(choices) > 1:
            errors.append(f"{where}: {len(choices)} choices for a single-choice control")
    if "id" in item:
        if item["id"] in ids:
            errors.append(f"{where}: duplicate result id {item['id']!r}")
        ids.add(item["id"])
    return errors


def _check_data(where: str, data: Any, config: ParsedConfig) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: 'data' must be an object"]
    errors = []
    for name, (tag, key) in config.objects.items():
        if key is None:
            continue
        if key not in data:
            errors.append(f'{where}: "{key}" key is expected in task data ({tag} {name})')
        elif not isinstance(data[key], OBJECT_TAG_TYPES[tag]):
            errors.append(f"{where}: data[{key!r}] is {type(data[key]).__name__}, {tag} expects {OBJECT_TAG_TYPES[tag]}")
        elif tag == "Image":
            url = urlparse(data[key])
            if url.scheme not in IMAGE_SCHEMES or not url.netloc:
                errors.append(f"{where}: data[{key!r}] = {data[key]!r} is not a URL Label Studio can load")
    return errors


def _check_prediction(where: str, prediction: Any, config: ParsedConfig) -> list[str]:
    if not isinstance(prediction, dict):
        return [f"{where}: not an object"]
    errors = [f"{where}: unexpected key {k!r}" for k in set(prediction) - PREDICTION_KEYS]
    if not isinstance(prediction.get("result"), list):
        return [*errors, f"{where}: prediction must have a 'result' list"]
    if "score" in prediction:
        score = prediction["score"]
        if isinstance(score, bool) or not isinstance(score, int | float):
            errors.append(f"{where}: Score must be a valid number")
        elif not 0.0 <= score <= 1.0:
            errors.append(f"{where}: Score must be between 0.00 and 1.00, got {score}")
    if "model_version" in prediction and not isinstance(prediction["model_version"], str):
        errors.append(f"{where}: model_version must be a string")
    ids: set[str] = set()
    for j, item in enumerate(prediction["result"]):
        errors += _check_result(f"{where}.result[{j}]", item, config, ids)
    return errors


def validate_import(tasks: Any, config_xml: str) -> list[str]:
    """Every way `tasks` (a parsed JSON import file) breaks Label Studio's import format for a
    project with `config_xml`; an empty list when it is accepted."""
    config, errors = parse_config(config_xml)
    if not isinstance(tasks, list) or not tasks:
        return [*errors, "an import file is a non-empty JSON list of tasks"]
    for i, task in enumerate(tasks):
        where = f"task[{i}]"
        if not isinstance(task, dict):
            errors.append(f"{where}: Task root must be dict")
            continue
        errors += [f"{where}: unexpected key {k!r}" for k in set(task) - TASK_KEYS]
        errors += _check_data(where, task.get("data"), config)
        for key in ("annotations", "predictions"):
            if key in task and not isinstance(task[key], list):
                errors.append(f"{where}: Task[{key}] must be a list")
        for j, prediction in enumerate(task.get("predictions", []) or []):
            errors += _check_prediction(f"{where}.predictions[{j}]", prediction, config)
    return errors


def labeled_export(tasks: list[dict[str, Any]], answers: dict[str, list[dict[str, Any]]],
                   start_id: int = 1) -> list[dict[str, Any]]:
    """What Label Studio's JSON export gives back for these imported tasks once labeled: each task
    with an `id`, its `data`, its `predictions`, and `annotations` in the documented shape.

    `answers`: product_id -> annotations, each {"choices": {attribute: value}, optional
    "was_cancelled", "updated_at"}; a product not in `answers` was never labeled.
    """
    exported = []
    annotation_id = 1000
    for offset, task in enumerate(tasks):
        task_id = start_id + offset
        annotations = []
        for answer in answers.get(task["data"]["product_id"], []):
            annotation_id += 1
            stamp = answer.get("updated_at", "2026-11-27T19:00:00.000000Z")
            annotations.append({
                "id": annotation_id,
                "result": [
                    {"id": f"r{annotation_id}{name}", "from_name": name, "to_name": "image", "type": "choices",
                     "origin": "manual", "value": {"choices": [value] if value else []}}
                    for name, value in answer["choices"].items()
                ],
                "was_cancelled": answer.get("was_cancelled", False), "ground_truth": False,
                "created_at": stamp, "updated_at": stamp, "lead_time": 4.2, "task": task_id, "completed_by": 1,
            })
        exported.append({"id": task_id, "data": task["data"], "annotations": annotations,
                         "predictions": task.get("predictions", []), "project": 7,
                         "created_at": "2026-11-27T18:00:00.000000Z", "updated_at": "2026-11-27T19:00:00.000000Z"})
    return exported
