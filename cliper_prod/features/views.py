"""Multi-view prompts (CLIPER, Section 3): one prompt per text field plus a global view.

The global view is a :class:`JoinedPrompt`: its text, and the pieces it joins (the template's
text around ``{}`` and the field prompts), so a tokenizer that never makes a token across a
space can give its ids as the pieces' ids, which the field views have just asked for
(:class:`~cliper_prod.features.tokenize.TokenCache`).

Missing-field policy: a field-view whose field is absent or empty is filled with
``missing_word`` ("Missing", as the authors' preprocessing writes), so every item has the same
number of views; the global view joins only the fields that are present. (The authors' code
formats only the last fragment of its global template, leaving a literal "{}" in it; here the
global template is formatted once with the joined field prompts.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TEMPLATES = {
    "title": "The product title is {}.",
    "brand": "The product brand is {}.",
    "categories": "The product categories are {}.",
    "description": "The product description is {}.",
}
GLOBAL_TEMPLATE = "The product descriptions are: {}"


SPACES = " \t\n"  # whitespace to any tokenizer's pattern (\s, Unicode or not)


class JoinedPrompt(str):
    """A prompt made of ``pieces``: the first, the middle ones joined with spaces, the last;
    the first ends and the last starts with whitespace where not empty, so every place two
    pieces meet is a space."""

    pieces: tuple[str, ...]

    def __new__(cls, text: str, pieces: tuple[str, ...]) -> "JoinedPrompt":
        prompt = super().__new__(cls, text)
        prompt.pieces = pieces
        return prompt

    def __reduce__(self) -> tuple:
        return JoinedPrompt, (str(self), self.pieces)


@dataclass(frozen=True)
class ViewSpec:
    fields: tuple[str, ...] = tuple(DEFAULT_TEMPLATES)
    templates: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    global_template: str | None = GLOBAL_TEMPLATE  # None: no global view
    missing_word: str = "Missing"

    def __post_init__(self) -> None:
        for name in self.fields:
            template = self.templates.get(name)
            if template is None or template.count("{}") != 1:
                raise ValueError(f"view {name!r} needs a template with exactly one '{{}}'")
        if self.global_template is not None and self.global_template.count("{}") != 1:
            raise ValueError("the global template needs exactly one '{}'")
        if not self.fields and self.global_template is None:
            raise ValueError("at least one view is needed")

    @classmethod
    def from_dict(cls, spec: dict) -> "ViewSpec":
        """Back from ``dataclasses.asdict`` as stored in JSON (lists where tuples were)."""
        return cls(fields=tuple(spec["fields"]), templates=dict(spec["templates"]),
                   global_template=spec["global_template"], missing_word=spec["missing_word"])

    @property
    def names(self) -> tuple[str, ...]:
        return self.fields + (("global",) if self.global_template is not None else ())

    def has_text(self, fields: dict[str, str]) -> bool:
        return any(name in fields for name in self.fields)

    def build(self, fields: dict[str, str]) -> list[str]:
        """The item's prompts, in the order of :attr:`names`."""
        views = [self.templates[n].format(fields.get(n, self.missing_word)) for n in self.fields]
        if self.global_template is not None:
            present = [view for n, view in zip(self.fields, views) if n in fields]
            views.append(self.global_view(present or [self.missing_word]))
        return views

    def global_view(self, parts: list[str]) -> str:
        """The global template around ``parts`` joined with spaces: a JoinedPrompt where the
        template's own text meets them on a space (and holds no other braces)."""
        text = self.global_template.format(" ".join(parts))
        before, _, after = self.global_template.partition("{}")
        if (self.global_template.count("{") > 1 or self.global_template.count("}") > 1
                or before[-1:] not in ("", *SPACES) or after[:1] not in ("", *SPACES)):
            return text
        return JoinedPrompt(text, (before, *parts, after))
