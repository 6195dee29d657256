"""The taxonomy: categories → attributes → candidate values, loaded from a versioned JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator


class AttributeValue(BaseModel):
    """One candidate value. Its caption (the text the model scores) defaults to the value."""

    value: str = Field(min_length=1, max_length=200)
    caption: str | None = Field(None, max_length=300)

    @property
    def text(self) -> str:
        return self.caption or self.value


class Attribute(BaseModel):
    values: list[AttributeValue] = Field(min_length=2)

    @field_validator("values")
    @classmethod
    def _unique(cls, values: list[AttributeValue]) -> list[AttributeValue]:
        names = [v.value for v in values]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate values: {names}")
        return values

    @property
    def value_names(self) -> list[str]:
        return [v.value for v in self.values]

    def captions(self, template: str | None = None) -> list[str]:
        """Texts to score, in value order: bare captions, or `template.format(caption)`."""
        return [template.format(v.text) if template else v.text for v in self.values]


class Category(BaseModel):
    attributes: dict[str, Attribute] = Field(min_length=1)
    zero_shot_template: str | None = Field(
        None, description="Template for zero-shot scoring, e.g. 'a photo of a top, {}'."
    )

    @field_validator("zero_shot_template")
    @classmethod
    def _has_slot(cls, template: str | None) -> str | None:
        if template is not None and "{}" not in template:
            raise ValueError("zero_shot_template must contain '{}'")
        return template


class Taxonomy(BaseModel):
    version: str = Field(min_length=1)
    categories: dict[str, Category] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> Taxonomy:
        for name in self.categories:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"category name {name!r} must be alphanumeric, '-' or '_'")
        return self

    def category(self, name: str) -> Category:
        """The category, or KeyError with the known names."""
        try:
            return self.categories[name]
        except KeyError:
            raise KeyError(
                f"unknown category {name!r}; the taxonomy {self.version} knows {sorted(self.categories)}"
            ) from None

    def check_labels(self, category: str, attributes: dict[str, str]) -> None:
        """Raise ValueError naming the first unknown category, attribute or value."""
        cat = self.category(category)
        if not attributes:
            raise ValueError("a label needs at least one attribute")
        for attr, value in attributes.items():
            if attr not in cat.attributes:
                raise ValueError(
                    f"unknown attribute {attr!r} for category {category!r}; known: {sorted(cat.attributes)}"
                )
            allowed = cat.attributes[attr].value_names
            if value not in allowed:
                raise ValueError(f"unknown value {value!r} for {category}.{attr}; allowed: {allowed}")


def load_taxonomy(path: Path | str) -> Taxonomy:
    """Read and validate a taxonomy JSON file."""
    return Taxonomy.model_validate(json.loads(Path(path).read_text()))
