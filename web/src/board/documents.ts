// The board's GraphQL documents live in board.graphql (validated against the server's
// schema by the Python suite).  `operation(name)` returns that operation's text with
// the fragments it spreads, transitively: each request carries only what it runs.
import source from "./board.graphql?raw";

const definitions = new Map<string, string>();
for (const block of source.split(/\n(?=(?:query|mutation|subscription|fragment) )/)) {
  const text = block.replace(/^(?:#.*\n|\s*\n)*/, "").trim();
  const match = /^(?:query|mutation|subscription|fragment) (\w+)/.exec(text);
  if (match) definitions.set(match[1], text);
}

function spreads(text: string): string[] {
  return [...text.matchAll(/\.\.\.(\w+)/g)].map((m) => m[1]);
}

export function operation(name: string): string {
  const root = definitions.get(name);
  if (!root) throw new Error(`no GraphQL operation named ${name}`);
  const parts = [root];
  const seen = new Set<string>([name]);
  const pending = spreads(root);
  while (pending.length) {
    const fragment = pending.shift() as string;
    if (seen.has(fragment)) continue;
    seen.add(fragment);
    const text = definitions.get(fragment);
    if (!text) throw new Error(`no GraphQL fragment named ${fragment}`);
    parts.push(text);
    pending.push(...spreads(text));
  }
  return parts.join("\n\n");
}
