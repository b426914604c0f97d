"""A request's output constraint: what its text must match (no grammar machinery here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["StructuredOutput", "StructuredOutputKind"]

StructuredOutputKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
_KINDS: tuple[str, ...] = get_args(StructuredOutputKind)


@dataclass
class StructuredOutput:
    """Constrain a request's generated text; set as ``SamplingParams.structured_output``.

    ``kind`` and ``spec``:

    - ``json_schema``: ``spec`` is a JSON schema (a dict, or its JSON text); the text is one
      JSON value that validates against it (properties the schema does not list are not
      generated). Compact layout: ``", "`` and ``": "`` separators, no newlines.
    - ``json_object``: ``spec`` is None; the text is one JSON object.
    - ``regex``: ``spec`` is a regular expression the whole text matches.
    - ``choice``: ``spec`` is a non-empty list of strings; the text is exactly one of them.
    - ``grammar``: ``spec`` is an EBNF grammar (GBNF style, start rule ``root``).

    Constructors: ``StructuredOutput.json_schema(schema)``, ``.json_object()``,
    ``.regex(pattern)``, ``.choice(options)``, ``.grammar(ebnf)``.

    A malformed ``spec`` (wrong type, invalid JSON, empty) raises ValueError here; one that is
    well-formed but does not compile (an unsupported schema feature, a bad regex) finishes the
    request with ``finish_reason="error"``. A json_schema ``spec`` is normalized to canonical
    JSON text (sorted keys), so equal schemas share one compiled grammar (``key``).
    """

    kind: StructuredOutputKind
    spec: Any = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        return cls("choice", options)

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredOutput:
        return cls("grammar", ebnf)

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any]) -> StructuredOutput | None:
        """From an OpenAI / LMDeploy ``response_format``: ``{"type": "text"}`` (None),
        ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}}}`` or LMDeploy's ``{"type": "regex_schema", "regex_schema": "..."}``.
        Raises ValueError for anything else."""
        if not isinstance(response_format, dict):
            raise ValueError(f"response_format must be a dict, got {response_format!r}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ValueError(
                    "a json_schema response_format needs 'json_schema': {'name': ..., "
                    "'schema': {...}}"
                )
            return cls.json_schema(spec["schema"])
        if kind == "regex_schema":
            return cls.regex(response_format.get("regex_schema"))  # type: ignore[arg-type]
        raise ValueError(
            f"response_format type must be text, json_object, json_schema or regex_schema, got "
            f"{kind!r}"
        )

    def validate(self) -> None:
        """Raise ValueError naming what is wrong; normalizes a json_schema ``spec`` to text."""
        if self.kind not in _KINDS:
            raise ValueError(
                f"structured_output kind must be one of {', '.join(_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "json_schema":
            schema = self.spec
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if isinstance(schema, bool):  # JSON Schema allows true / false as schemas
                schema = {} if schema else {"not": {}}
            if not isinstance(schema, dict):
                raise ValueError(
                    f"a JSON schema must be a JSON object, got {type(schema).__name__}"
                )
            self.spec = json.dumps(schema, sort_keys=True, ensure_ascii=False)
        elif self.kind == "json_object":
            if self.spec is not None:
                raise ValueError("a json_object constraint takes no spec (leave it None)")
        elif self.kind == "choice":
            if (
                not isinstance(self.spec, (list, tuple))
                or not self.spec
                or not all(isinstance(s, str) and s for s in self.spec)
            ):
                raise ValueError(
                    f"a choice constraint needs a non-empty list of non-empty strings, got "
                    f"{self.spec!r}"
                )
            self.spec = list(self.spec)
        elif not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(
                f"a {self.kind} constraint needs a non-empty string, got {self.spec!r}"
            )

    @property
    def key(self) -> tuple[str, str]:
        """Cache key: equal keys compile to the same grammar."""
        if self.kind == "choice":
            return (self.kind, json.dumps(self.spec, ensure_ascii=False))
        return (self.kind, "" if self.spec is None else str(self.spec))
