"""GraphiQL from the package's own assets, in a real browser with every request to a
host other than the server blocked and counted (issue 9): a query with a header from
the headers tab, and a subscription over graphql-transport-ws whose `connection_init`
carries that header."""

from __future__ import annotations

import json
import re

from playwright.sync_api import Page, expect

from app.auth.models import Role
from tests.browser.conftest import Api, allow, make_token, screenshot

SUBMIT = """
mutation($input: SubmitJobInput!) { submitJob(input: $input) { job { id } } }
"""


def editor(page: Page, selector: str) -> str:
    """A JS expression for the CodeMirror instance in `selector`."""
    return f"document.querySelector({json.dumps(selector + ' .CodeMirror')}).CodeMirror"


def set_editor(page: Page, selector: str, text: str) -> None:
    page.evaluate(f"text => {editor(page, selector)}.setValue(text)", text)


def response_text(page: Page) -> str:
    return str(page.evaluate(f"{editor(page, '.graphiql-response')}.getValue()"))


def open_graphiql(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/graphql")
    expect(page.locator(".graphiql-query-editor .CodeMirror")).to_have_count(1, timeout=30_000)
    headers = page.locator(".graphiql-editor-tool .graphiql-editor:not(.hidden)")
    expect(headers).to_have_count(1)
    page.evaluate(
        """text => {
          const visible = document.querySelector(
            '.graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror');
          visible.CodeMirror.setValue(text);
        }""",
        json.dumps({"Authorization": f"Bearer {token}"}),
    )


def settle(page: Page, query: str, token: str, operation: str | None = None) -> None:
    """Wait until GraphiQL's own state holds the editors' text: it takes the query, its
    operation name and the headers from the editors with a debounce, and a run started
    before that would send the previous operation name."""
    page.wait_for_function(
        """([query, token, operation]) => {
          const state = JSON.parse(localStorage.getItem('graphiql:tabState') || '{}');
          const tab = (state.tabs || [])[state.activeTabIndex];
          return Boolean(tab) && tab.query === query && (tab.headers || '').includes(token)
            && (operation === null || tab.operationName === operation);
        }""",
        arg=[query, token, operation],
    )


def run(page: Page) -> None:
    page.locator(".graphiql-execute-button").click()


def test_graphiql_runs_a_query_with_a_header_and_nothing_leaves_the_server(
    page, offsite, server, browser_db
):
    allow(offsite, server)
    token = make_token(browser_db, "graphiql0", Role.MEMBER)
    open_graphiql(page, server.url, token)
    set_editor(page, ".graphiql-query-editor", "{ viewer { role } }")
    settle(page, "{ viewer { role } }", token)
    run(page)
    expect(page.locator(".graphiql-response")).to_contain_text('"role": "MEMBER"', timeout=20_000)
    assert json.loads(response_text(page)) == {"data": {"viewer": {"role": "MEMBER"}}}
    screenshot(page, "graphiql")
    assert offsite.blocked == [], f"requests to other hosts: {offsite.blocked}"


def test_graphiql_subscribes_with_the_header_in_connection_init(
    page, offsite, server, browser_db
):
    allow(offsite, server)
    token = make_token(browser_db, "graphiql1", Role.MEMBER)
    member = Api(server, token)
    # From a cursor, so the job submitted below is seen however late the server subscribes.
    cursor = member.data("{ viewer { eventCursor } }")["viewer"]["eventCursor"]
    open_graphiql(page, server.url, token)
    query = f'subscription Live {{ jobStageChanged(after: "{cursor}") {{ jobId to }} }}'
    set_editor(page, ".graphiql-query-editor", query)
    settle(page, query, token, "Live")
    run(page)
    expect(page.locator(".graphiql-execute-button")).to_have_attribute(
        "aria-label", re.compile("^Stop query"), timeout=20_000)
    job_id = member.data(SUBMIT, input={"title": "seen in GraphiQL", "bodyMd": "x"})[
        "submitJob"]["job"]["id"]
    expect(page.locator(".graphiql-response")).to_contain_text(
        f'"jobId": "{job_id}"', timeout=20_000)
    assert '"to": "QUEUED"' in response_text(page)
    assert offsite.blocked == []
