// GraphiQL from the npm packages' own builds, bundled by Vite and served by
// fleetbridge itself: nothing is fetched from another host.  Queries and mutations go
// over HTTP with the headers tab's headers; subscriptions go over graphql-transport-ws
// (the `graphql-ws` client inside @graphiql/toolkit), and the toolkit sends the same
// headers as the `connection_init` payload, where the server reads `Authorization`.
import { createGraphiQLFetcher } from "@graphiql/toolkit";
import { GraphiQL } from "graphiql";
import "graphiql/graphiql.css";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";

const TOKEN_KEY = "fleetbridge.token";

const DEFAULT_QUERY = `# fleetbridge GraphiQL: set a header in the Headers tab below,
#   {"Authorization": "Bearer <token>"}
# then run with Ctrl-Enter.  Subscriptions work too (over graphql-transport-ws).

query Viewer {
  viewer { productId role eventCursor }
}
`;

const url = `${window.location.origin}${window.location.pathname}`;
const subscriptionUrl = url.replace(/^http/, "ws");
const fetcher = createGraphiQLFetcher({ url, subscriptionUrl, enableIncrementalDelivery: false });

// A token the board stored in this tab fills the headers tab, as a convenience.
const boardToken = window.sessionStorage.getItem(TOKEN_KEY);
const defaultHeaders = JSON.stringify(
  { Authorization: `Bearer ${boardToken ?? "<token>"}` },
  null,
  2,
);

const container = document.getElementById("graphiql");
if (container) {
  createRoot(container).render(
    <StrictMode>
      <GraphiQL
        fetcher={fetcher}
        defaultQuery={DEFAULT_QUERY}
        defaultHeaders={defaultHeaders}
        defaultEditorToolsVisibility="headers"
        isHeadersEditorEnabled
        shouldPersistHeaders
      />
    </StrictMode>,
  );
}
