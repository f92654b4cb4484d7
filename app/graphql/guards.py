"""Request guards that run once per operation, before anything executes (DESIGN §8).

- Text that cannot be stored: a lone UTF-16 surrogate in any string argument (a
  variable's value or a literal in the document) is `BAD_USER_INPUT` naming the field
  as the client wrote it (`input.title`, `label`, `worker.workerId`…), on both stores
  alike, before any resolver runs.  One seam, so no field is missed.
- Ambiguous documents: several operations and no `operationName` is an error (the
  GraphQL spec's "GetOperation"), never "run the first one".
- Cost: every selected field costs 1, and what is selected under a connection's
  `nodes`/`edges` costs `first` times over (the page sizes of nested lists multiply).
  A query above `FLEET_MAX_QUERY_COST` is refused before execution.
- Introspection: with `FLEET_INTROSPECTION=false`, `__schema`/`__type` are refused
  (graphql-core's `NoSchemaIntrospectionCustomRule`); `__typename` stays allowed.

All refusals are `FleetError`s: the client sees their `extensions.code`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    ListValueNode,
    Node,
    ObjectValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    StringValueNode,
    ValueNode,
    VariableNode,
    get_named_type,
)
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import SchemaExtension

from app.errors import BadUserInputError, QueryRefusedError
from app.graphql.documents import DOCUMENTS
from app.limits import PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX

SURROGATES_MESSAGE = "must be valid Unicode text (no lone surrogate characters)"


def is_storable(value: str) -> bool:
    """False when `value` holds a lone UTF-16 surrogate (no database can store it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- unstorable text ----------------------------------------------------------


def _bad_path(value: object, path: str) -> str | None:
    """The path (`a.b`, list positions left out) of the first unstorable string in a
    JSON value, or None."""
    if isinstance(value, str):
        return None if is_storable(value) else path
    if isinstance(value, Mapping):
        for key, inner in value.items():
            key_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not is_storable(key):
                return path or "variables"
            found = _bad_path(inner, key_path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for inner in value:
            found = _bad_path(inner, path)
            if found is not None:
                return found
    return None


def _argument_values(document: DocumentNode) -> Iterator[tuple[str, ValueNode]]:
    """Every argument value in the document, with its argument's name."""
    stack: list[Node] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, FieldNode):
            for argument in node.arguments or ():
                yield argument.name.value, argument.value
        for key in node.keys:
            child = getattr(node, key, None)
            if isinstance(child, Node) and not isinstance(child, ValueNode):
                stack.append(child)
            elif isinstance(child, tuple | list):
                stack.extend(c for c in child if isinstance(c, Node)
                             and not isinstance(c, ValueNode))


def _walk_value(node: ValueNode, path: str) -> Iterator[tuple[str, ValueNode]]:
    yield path, node
    if isinstance(node, ObjectValueNode):
        for field in node.fields:
            yield from _walk_value(field.value, f"{path}.{field.name.value}")
    elif isinstance(node, ListValueNode):
        for inner in node.values:
            yield from _walk_value(inner, path)


def _text_facts(document: DocumentNode) -> tuple[str | None, dict[str, str]]:
    """(the path of the first literal string that cannot be stored, or None; where
    each variable is first used) — the document's part of `check_storable_text`, the
    same for every request of one document (kept by app.graphql.documents)."""
    used_at: dict[str, str] = {}
    for name, value in _argument_values(document):
        for path, node in _walk_value(value, name):
            if isinstance(node, StringValueNode) and not is_storable(node.value):
                return path, used_at
            if isinstance(node, VariableNode):
                used_at.setdefault(node.name.value, path)
    return None, used_at


def check_storable_text(document: DocumentNode, variables: Mapping[str, Any] | None) -> None:
    """Raise `BadUserInputError` naming the field of the first lone surrogate in a
    string argument (literal or variable).  A variable is named by where the document
    uses it (`createItem(input: {title: $t})` → `input.title`), else as `$name`."""
    bad_literal, used_at = DOCUMENTS.fact(document, "text", _text_facts)
    if bad_literal is not None:
        raise BadUserInputError(bad_literal, SURROGATES_MESSAGE)
    if not isinstance(variables, Mapping):
        return  # not an object: graphql-core refuses it on its own
    for name, value in variables.items():
        base = used_at.get(name, f"${name}") if isinstance(name, str) else "variables"
        found = _bad_path(value, base)
        if found is not None or (isinstance(name, str) and not is_storable(name)):
            raise BadUserInputError(found or "variables", SURROGATES_MESSAGE)


# -- the operation ------------------------------------------------------------


def select_operation(
    document: DocumentNode, operation_name: str | None
) -> OperationDefinitionNode | None:
    """The operation to run (GraphQL spec, GetOperation): the named one, or the only
    one; several operations and no name is refused."""
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name is None:
        if len(operations) > 1:
            raise QueryRefusedError(
                "Must provide operation name if query contains multiple operations."
            )
        return operations[0] if operations else None
    for operation in operations:
        if operation.name is not None and operation.name.value == operation_name:
            return operation
    return None  # graphql-core reports the unknown name


# -- cost ---------------------------------------------------------------------


class _Cost:
    def __init__(self, schema: GraphQLSchema, document: DocumentNode,
                 variables: Mapping[str, Any] | None) -> None:
        self.schema = schema
        self.variables = variables or {}
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }

    def page_size(self, node: FieldNode, default: object) -> int:
        size: object = default if isinstance(default, int) else PAGE_SIZE_DEFAULT
        for argument in node.arguments or ():
            if argument.name.value != "first":
                continue
            value = argument.value
            if isinstance(value, IntValueNode):
                size = int(value.value)
            elif isinstance(value, VariableNode):
                size = self.variables.get(value.name.value, size)
        if not isinstance(size, int) or isinstance(size, bool):
            return PAGE_SIZE_DEFAULT  # null: the default page; other types fail validation
        return max(0, min(size, PAGE_SIZE_MAX))  # out of range: refused by the resolver

    def of(self, selections: SelectionSetNode, parent: GraphQLObjectType, page: int | None,
           seen: frozenset[str] = frozenset()) -> int:
        total = 0
        for selection in selections.selections:
            if isinstance(selection, FieldNode):
                total += self.of_field(selection, parent, page, seen)
            elif isinstance(selection, InlineFragmentNode):
                total += self.of(selection.selection_set, self.type_of(selection, parent),
                                 page, seen)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = self.fragments.get(name)
                if fragment is not None and name not in seen:
                    total += self.of(fragment.selection_set, self.type_of(fragment, parent),
                                     page, seen | {name})
        return total

    def of_field(self, node: FieldNode, parent: GraphQLObjectType, page: int | None,
                 seen: frozenset[str]) -> int:
        name = node.name.value
        field = parent.fields.get(name)
        if name.startswith("__") or field is None:
            return 1  # introspection reads no rows
        inner = 0
        named = get_named_type(field.type)
        if node.selection_set is not None and isinstance(named, GraphQLObjectType):
            sub_page = None
            if named.name.endswith("Connection"):
                argument = field.args.get("first")
                sub_page = self.page_size(node, argument.default_value if argument else None)
            inner = self.of(node.selection_set, named, sub_page, seen)
        weight = page if page is not None and name in ("nodes", "edges") else 1
        return weight * (1 + inner)

    def type_of(self, node: InlineFragmentNode | FragmentDefinitionNode,
                parent: GraphQLObjectType) -> GraphQLObjectType:
        if node.type_condition is None:
            return parent
        named = self.schema.get_type(node.type_condition.name.value)
        return named if isinstance(named, GraphQLObjectType) else parent


def operation_cost(schema: GraphQLSchema, document: DocumentNode,
                   operation: OperationDefinitionNode,
                   variables: Mapping[str, Any] | None) -> int:
    """How many fields `operation` may resolve at most: 1 per field, times `first`
    (default 50, at most 200) under each connection's `nodes`/`edges`."""
    root = schema.get_root_type(operation.operation)
    if root is None:
        return 0
    return _Cost(schema, document, variables).of(operation.selection_set, root, None)


def _page_sizes_from_variables(document: DocumentNode) -> bool:
    """Whether any `first` argument in `document` takes a variable (then the cost
    depends on each request's variables)."""
    return any(name == "first" and isinstance(value, VariableNode)
               for name, value in _argument_values(document))


def request_cost(schema: GraphQLSchema, document: DocumentNode,
                 operation: OperationDefinitionNode,
                 variables: Mapping[str, Any] | None) -> int:
    """`operation_cost`, kept with the document (app.graphql.documents) when no page
    size comes from a variable: the same document always costs the same then, and
    a client repeating it (`{ viewer { role } }`, the worker's mutations) is not
    walked again on every request."""
    if DOCUMENTS.fact(document, "cost uses variables", _page_sizes_from_variables):
        return operation_cost(schema, document, operation, variables)
    costs: dict[tuple[GraphQLSchema, int], int] = DOCUMENTS.fact(
        document, "costs", lambda _: {})
    key = (schema, id(operation))  # the operation is a node of this very document
    cost = costs.get(key)
    if cost is None:
        cost = costs[key] = operation_cost(schema, document, operation, variables)
    return cost


# -- the extension -------------------------------------------------------------


class RequestGuards(SchemaExtension):
    """Runs the guards above for every operation (HTTP and websocket alike); the
    limits come from the app's settings (`context.services.settings`)."""

    def _settings(self) -> Any:
        services = getattr(self.execution_context.context, "services", None)
        return getattr(services, "settings", None)

    def on_operation(self) -> Iterator[None]:
        settings = self._settings()
        if settings is not None and not settings.introspection:
            self.execution_context.validation_rules = (
                *self.execution_context.validation_rules, NoSchemaIntrospectionCustomRule,
            )
        yield

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None:
            # strawberry fills `operation_name` in from the first operation; the spec
            # goes by what the client sent
            provided = getattr(context, "_provided_operation_name", context.operation_name)
            operation = select_operation(document, provided)
            check_storable_text(document, context.variables)
            settings = self._settings()
            if operation is not None and settings is not None:
                cost = request_cost(context.schema._schema, document, operation,
                                    context.variables)
                if cost > settings.max_query_cost:
                    raise QueryRefusedError(
                        f"the query may resolve up to {cost} fields, above the limit of "
                        f"{settings.max_query_cost}: ask for smaller pages (first) or "
                        "fewer nested lists",
                        extensions={"cost": cost, "maxCost": settings.max_query_cost},
                    )
        yield
