// Rendering: the header, the columns of cards and the item panel, built from BoardState.
import { PRIORITIES, STAGES, type Comment, type ItemDetail, type Job, type Role, type Stage } from "./api";
import { h, type Child } from "./dom";
import { type BoardState, isActive } from "./state";

export interface Actions {
  cancel(job: Job): void;
  retry(job: Job): void;
  ingest(itemId: string): void;
  openItem(itemId: string): void;
  showMore(stage: Stage): void;
}

const money = new Intl.NumberFormat("en", { style: "currency", currency: "USD", maximumFractionDigits: 4 });

export function canAct(role: Role): boolean {
  return role === "MEMBER" || role === "ADMIN";
}

/** "4:05 left", "expired": the lease time left, from the browser's clock. */
export function leaseLeft(expiresAt: string, now = Date.now()): string {
  const seconds = Math.floor((Date.parse(expiresAt) - now) / 1000);
  if (seconds <= 0) return "expired";
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${String(seconds % 60).padStart(2, "0")} left`;
}

function fact(label: string, ...value: Child[]): HTMLElement {
  return h("div", { class: "fact" }, h("dt", {}, label), h("dd", {}, ...value));
}

export function card(job: Job, role: Role, actions: Actions): HTMLElement {
  const act = canAct(role);
  const buttons: HTMLElement[] = [];
  if (act && isActive(job)) {
    buttons.push(h("button", { type: "button", class: "danger", "data-action": "cancel", onclick: () => actions.cancel(job) }, "Cancel"));
  }
  if (act && (job.stage === "FAILED" || job.stage === "CANCELLED")) {
    buttons.push(h("button", { type: "button", "data-action": "retry", onclick: () => actions.retry(job) }, "Retry"));
  }
  const item = job.item;
  return h("article", { class: `card stage-${job.stage}`, "data-job-id": job.id, "data-stage": job.stage },
    h("div", { class: "card-top" },
      h("span", { class: "job-id" }, `#${job.id}`),
      h("span", { class: `priority p-${job.priority}` }, job.priority)),
    h("h3", { class: "title" }, job.title),
    job.capabilities.length > 0 && h("div", { class: "chips" }, job.capabilities.map((c) => h("span", { class: "chip" }, c))),
    h("dl", { class: "facts" },
      job.engineClass && fact("engine", job.engineClass),
      job.lease && fact("worker", job.lease.workerId),
      fact("attempt", `${job.attempts}/${job.maxAttempts}`),
      job.lease && isActive(job) && fact("lease", h("span", { "data-expires": job.lease.expiresAt }, leaseLeft(job.lease.expiresAt))),
      item && fact("item", h("a", { href: `#item-${item.id}`, onclick: (event: Event) => { event.preventDefault(); actions.openItem(item.id); } },
        `#${item.id} ${item.title}`), " ", h("span", { class: `status s-${item.status}` }, item.status)),
      job.metrics.costUsd !== null && fact("cost", money.format(job.metrics.costUsd))),
    job.failureReason && (job.stage === "FAILED" || job.stage === "CANCELLED")
      && h("p", { class: "reason" }, job.failureReason),
    buttons.length > 0 && h("div", { class: "actions" }, buttons));
}

export function header(state: BoardState, productId: string, role: Role, live: boolean,
  handlers: { items(): void; signOut(): void }): HTMLElement {
  const counts = state.counts();
  const depth = state.queueDepth();
  const queueComplete = counts.get("QUEUED")?.complete ?? true;
  return h("header", { class: "bar" },
    h("div", { class: "brand" }, h("strong", {}, "fleetbridge"), h("span", { class: "muted" }, ` ${productId} · ${role.toLowerCase()}`)),
    h("span", { class: `live ${live ? "on" : "off"}`, "data-live": live ? "live" : "reconnecting", role: "status" },
      live ? "● live" : "○ reconnecting…"),
    h("div", { class: "depth", title: "queued jobs per priority" },
      h("span", { class: "muted" }, "queue"),
      PRIORITIES.map((p) => h("span", { class: `priority p-${p}`, "data-priority": p }, `${p} ${depth.get(p) ?? 0}${queueComplete ? "" : "+"}`))),
    h("nav", { class: "tools" },
      h("button", { type: "button", onclick: handlers.items }, "Items"),
      h("a", { href: "/graphql", class: "button" }, "GraphiQL"),
      h("button", { type: "button", onclick: handlers.signOut }, "Sign out")),
    h("div", { class: "stage-counts" }, STAGES.map((stage) => {
      const c = counts.get(stage) as { count: number; complete: boolean };
      return h("span", { class: `count stage-${stage}`, "data-count-stage": stage }, `${stage} ${c.count}${c.complete ? "" : "+"}`);
    })));
}

export function column(state: BoardState, stage: Stage, role: Role, actions: Actions): HTMLElement {
  const jobs = state.jobsIn(stage);
  const info = state.columns.get(stage);
  const shown = info?.shown ?? jobs.length;
  const more = jobs.length > shown || Boolean(info?.hasNextPage);
  const c = state.counts().get(stage) as { count: number; complete: boolean };
  return h("section", { class: `column stage-${stage}`, "data-column": stage },
    h("h2", {}, stage, " ", h("span", { class: "muted" }, `${c.count}${c.complete ? "" : "+"}`)),
    h("div", { class: "cards" },
      jobs.slice(0, shown).map((job) => card(job, role, actions)),
      jobs.length === 0 && h("p", { class: "empty muted" }, "no jobs")),
    more && h("button", { type: "button", class: "more", disabled: info?.loading ?? false, onclick: () => actions.showMore(stage) },
      info?.loading ? "loading…" : `show more (${Math.max(jobs.length - shown, 0)}${info?.hasNextPage ? "+" : ""})`));
}

export function itemList(state: BoardState, role: Role, actions: Actions, more: () => void): HTMLElement {
  const items = state.itemsInOrder();
  return h("div", { class: "item-list" },
    items.length === 0 && h("p", { class: "muted" }, state.itemsPage.loaded ? "no items" : "loading…"),
    items.map((item) => h("div", { class: "item-row", "data-item-id": item.id },
      h("a", { href: `#item-${item.id}`, onclick: (event: Event) => { event.preventDefault(); actions.openItem(item.id); } },
        `#${item.id} ${item.title}`),
      h("span", { class: `status s-${item.status}` }, item.status),
      h("div", { class: "chips" }, item.labels.map((label) => h("span", { class: "chip" }, label))),
      canAct(role) && item.status !== "CANCELLED"
        && h("button", { type: "button", "data-action": "ingest", onclick: () => actions.ingest(item.id) }, "Ingest"))),
    state.itemsPage.hasNextPage && h("button", { type: "button", class: "more", onclick: more }, "more items"));
}

function comment(c: Comment): HTMLElement {
  return h("li", { class: `comment kind-${c.kind}` },
    h("div", { class: "muted" }, `${c.author} · ${c.kind.toLowerCase()} · ${new Date(c.createdAt).toLocaleString()}`),
    h("pre", {}, c.body));
}

export function itemDetail(item: ItemDetail, jobs: Job[], role: Role, actions: Actions, back: () => void): HTMLElement {
  return h("div", { class: "item-detail", "data-item-id": item.id },
    h("button", { type: "button", class: "link", onclick: back }, "← all items"),
    h("h2", {}, `#${item.id} ${item.title}`),
    h("div", {}, h("span", { class: `status s-${item.status}` }, item.status), " ",
      h("span", { class: "chips" }, item.labels.map((label) => h("span", { class: "chip" }, label)))),
    item.description && h("pre", { class: "description" }, item.description),
    canAct(role) && item.status !== "CANCELLED"
      && h("button", { type: "button", "data-action": "ingest", onclick: () => actions.ingest(item.id) }, "Ingest as a job"),
    h("h3", {}, `Jobs (${jobs.length})`),
    jobs.length === 0 ? h("p", { class: "muted" }, "no jobs yet") : h("ul", { class: "item-jobs" }, jobs.map((job) =>
      h("li", { "data-item-job": job.id },
        h("span", { class: "job-id" }, `#${job.id}`), " ", job.title, " ",
        h("span", { class: `stage-tag stage-${job.stage}` }, job.stage),
        job.failureReason && h("span", { class: "muted" }, ` (${job.failureReason})`)))),
    h("h3", {}, `Comments (${item.comments.nodes.length}${item.comments.pageInfo.hasNextPage ? "+" : ""})`),
    h("ul", { class: "comments" }, item.comments.nodes.map(comment)));
}
