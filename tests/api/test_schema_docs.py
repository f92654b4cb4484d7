"""Every type, field, argument, input field and enum value of the schema has a
description, so GraphiQL's docs pane and the SDL explain the whole API (issue 10)."""

from __future__ import annotations

from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
)

from app.graphql.schema import schema


def undocumented(graphql_schema: GraphQLSchema) -> list[str]:
    """Coordinates (`Type.field(arg:)`) of every schema element without a description;
    introspection types are graphql-core's own."""
    missing: list[str] = []

    def check(coordinate: str, description: str | None) -> None:
        if not (description and description.strip()):
            missing.append(coordinate)

    for name, named in graphql_schema.type_map.items():
        if name.startswith("__"):
            continue
        check(name, named.description)
        if isinstance(named, GraphQLObjectType | GraphQLInterfaceType):
            for field_name, field in named.fields.items():
                check(f"{name}.{field_name}", field.description)
                for arg_name, arg in field.args.items():
                    check(f"{name}.{field_name}({arg_name}:)", arg.description)
        elif isinstance(named, GraphQLInputObjectType):
            for field_name, input_field in named.fields.items():
                check(f"{name}.{field_name}", input_field.description)
        elif isinstance(named, GraphQLEnumType):
            for value_name, value in named.values.items():
                check(f"{name}.{value_name}", value.description)
    return missing


def test_every_schema_element_has_a_description() -> None:
    assert undocumented(schema._schema) == []


def test_the_walk_finds_a_missing_description() -> None:
    """The check itself catches a missing description at each level."""
    from graphql import build_schema

    bare = build_schema(
        '"Q" type Query { "f" f(a: Int): E }\n enum E { "x" X Y }\n input I { i: Int }'
    )
    assert undocumented(bare) == ["Query.f(a:)", "E", "E.Y", "I", "I.i"]
