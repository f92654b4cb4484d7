"""Parsed and validated documents, cached per process (issue 12 §3).

A client sends the same few documents over and over; parsing and validating each
again costs more than running `{ viewer { role } }`.  `CachedDocuments` (a schema
extension) keeps, per query text and parse options (the token limit), the parsed
document, and with it the validation result per set of validation rules (the depth
and alias limits, built once — see app.graphql.schema — and the introspection switch).

Errors keep exactly the path and shape they have without the cache:

* A document that does not parse (or breaks the token limit) is not cached: the
  extension leaves `graphql_document` unset and strawberry parses it itself, inside
  its own error handling, so the error is masked and coded as before
  (GRAPHQL_PARSE_FAILED / GRAPHQL_VALIDATION_FAILED).  Its text is remembered as
  bad, so a repeated bad document is parsed once per request, as without a cache.
  (strawberry's ParserCache raises the parse error from the extension hook instead,
  which skips that handling — why it is not used.)
* Validation errors are cached, and each request gets copies: the error formatting
  (app.graphql.schema `MaskUnexpectedErrors`) edits the errors it is given.

Bounded: DOCUMENT_CACHE_SIZE texts, least recently used evicted, and texts longer
than MAX_CACHED_CHARS are never cached (a hostile client sending unique large
documents only evicts, and holds no more than size times that many characters).  The
documents are shared between concurrent requests: nothing in graphql-core or the
service edits a parsed document.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse
from strawberry.extensions import SchemaExtension
from strawberry.schema.schema import validate_document

DOCUMENT_CACHE_SIZE = 256
MAX_CACHED_CHARS = 20_000

Rules = tuple[type[ASTValidationRule], ...]
T = TypeVar("T")


@dataclass(slots=True)
class _Entry:
    document: DocumentNode | None  # None: the text does not parse (not cached)
    validated: dict[Rules, tuple[GraphQLError, ...]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # see DocumentCache.fact


@dataclass(slots=True)
class CacheStats:
    parse_hits: int = 0
    parse_misses: int = 0
    validation_hits: int = 0
    validation_misses: int = 0


def _copy(error: GraphQLError) -> GraphQLError:
    return GraphQLError(
        error.message, nodes=error.nodes, source=error.source, positions=error.positions,
        path=error.path, original_error=error.original_error,
        extensions=dict(error.extensions) if error.extensions else None,
    )


class DocumentCache:
    """LRU of query text → parsed document and its validation results."""

    def __init__(self, maxsize: int = DOCUMENT_CACHE_SIZE,
                 max_chars: int = MAX_CACHED_CHARS) -> None:
        self.maxsize = maxsize
        self.max_chars = max_chars
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, tuple[tuple[str, Any], ...]], _Entry] = (
            OrderedDict()
        )
        self._by_document: dict[int, _Entry] = {}

    def parse(self, query: str, options: Mapping[str, Any]) -> DocumentNode | None:
        """The parsed document, or None when `query` is not cached (too long) or does
        not parse — strawberry then parses it itself and reports the error."""
        if len(query) > self.max_chars:
            return None
        key = (query, tuple(sorted(options.items())))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.stats.parse_hits += 1
            return entry.document
        self.stats.parse_misses += 1
        try:
            document: DocumentNode | None = parse(query, **options)
        except GraphQLError:
            document = None
        except Exception:  # whatever else parse raises is strawberry's to report
            return None
        entry = _Entry(document)
        self._entries[key] = entry
        if document is not None:
            self._by_document[id(document)] = entry
        while len(self._entries) > self.maxsize:
            _, evicted = self._entries.popitem(last=False)
            if evicted.document is not None:
                self._by_document.pop(id(evicted.document), None)
        return document

    def validate(self, schema: GraphQLSchema, document: DocumentNode,
                 rules: Sequence[type[ASTValidationRule]]) -> list[GraphQLError]:
        """graphql-core's validation (with strawberry's own rules added), from the
        cache when `document` came from it; the errors are fresh copies."""
        entry = self._by_document.get(id(document))
        if entry is None or entry.document is not document:
            return validate_document(schema, document, tuple(rules))
        key = tuple(rules)
        errors = entry.validated.get(key)
        if errors is None:
            self.stats.validation_misses += 1
            errors = tuple(validate_document(schema, document, key))
            entry.validated[key] = errors
        else:
            self.stats.validation_hits += 1
        return [_copy(error) for error in errors]


    def fact(self, document: DocumentNode, name: str, compute: Callable[[DocumentNode], T]) -> T:
        """`compute(document)`, kept with the document when it came from the cache
        (what the request guards derive from a document alone, app.graphql.guards).
        `compute` must depend on nothing but the document."""
        entry = self._by_document.get(id(document))
        if entry is None or entry.document is not document:
            return compute(document)
        if name not in entry.facts:
            entry.facts[name] = compute(document)
        value: T = entry.facts[name]
        return value


DOCUMENTS = DocumentCache()


class CachedDocuments(SchemaExtension):
    """Parse and validate through `DOCUMENTS` (see the module docstring)."""

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.graphql_document is None and context.query:
            context.graphql_document = DOCUMENTS.parse(context.query, context.parse_options)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        if (context.pre_execution_errors is None and context.graphql_document is not None
                and context.validation_rules):
            context.pre_execution_errors = DOCUMENTS.validate(
                context.schema._schema, context.graphql_document, context.validation_rules
            )
        yield
