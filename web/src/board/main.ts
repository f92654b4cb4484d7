// The fleet board: sign in with a token, read the board and the event cursor in one
// query, then follow the live feed from that cursor.  Only the public GraphQL API.
import { Api, ApiError, STAGES, type Item, type ItemDetail, type Job, type JobPage, type Role, type Stage, type Viewer } from "./api";
import { h, replaceChildren } from "./dom";
import { LiveFeed } from "./live";
import { BoardState, PAGE_SIZE } from "./state";
import "./style.css";
import { type Actions, column, header, itemDetail, itemList, leaseLeft } from "./view";

const TOKEN_KEY = "fleetbridge.token";
const BACKGROUND_PAGE = 200; // active columns are read whole, in pages of this size
const ACTIVE_COLUMN_MAX = 5_000;

type BoardData = { viewer: Viewer } & Record<Stage, JobPage>;

const root = document.getElementById("app") as HTMLElement;

function signInScreen(message?: string): void {
  const input = h("input", {
    name: "token", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "paste a fleetbridge token", "aria-label": "token", required: true,
  }) as HTMLInputElement;
  const form = h("form", {
    class: "signin",
    onsubmit: (event: Event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (token) void open(token);
    },
  },
  h("h1", {}, "fleetbridge board"),
  h("p", { class: "muted" }, "Sign in with a member, worker or admin token (",
    h("code", {}, "fleetbridge token create"), ")."),
  input,
  h("button", { type: "submit" }, "Sign in"),
  message && h("p", { class: "error", role: "alert" }, message));
  replaceChildren(root, form);
  input.focus();
}

function explain(error: unknown): string {
  if (error instanceof ApiError) {
    if (error.code === "UNAUTHENTICATED") return `That token was not accepted: ${error.message}`;
    if (error.code === "NETWORK") return `The server cannot be reached (${error.message}); try again.`;
    return `${error.message} (${error.code})`;
  }
  return String(error);
}

async function open(token: string): Promise<void> {
  const api = new Api(token);
  let data: BoardData;
  try {
    data = await api.run<BoardData>("Board", { first: PAGE_SIZE });
  } catch (error) {
    window.sessionStorage.removeItem(TOKEN_KEY);
    signInScreen(explain(error));
    return;
  }
  window.sessionStorage.setItem(TOKEN_KEY, token);
  new Board(api, token, data).start();
}

class Board {
  private readonly state = new BoardState();
  private readonly role: Role;
  private readonly productId: string;
  private live = false;
  private feed: LiveFeed;
  private frame = 0;
  private ticker = 0;
  private panel: { open: boolean; itemId: string | null; detail: ItemDetail | null; jobs: Job[] } =
    { open: false, itemId: null, detail: null, jobs: [] };
  private detailTimer = 0;
  private jobEvents = 0; // events applied, shown as data-job-events (for tests and support)
  private readonly headerSlot = h("div", { class: "header-slot" });
  private readonly columnsEl = h("main", { class: "columns" });
  private readonly panelEl = h("aside", { class: "panel", hidden: true, "aria-label": "items" });
  private readonly toastEl = h("div", { class: "toast", role: "status", "aria-live": "polite" });
  private readonly actions: Actions;

  constructor(private readonly api: Api, token: string, data: BoardData) {
    this.role = data.viewer.role;
    this.productId = data.viewer.productId;
    for (const stage of STAGES) this.state.addPage(stage, data[stage]);
    this.actions = {
      cancel: (job) => void this.mutate("CancelJob", { jobId: job.id, reason: "cancelled from the board" }, "cancelJob", `#${job.id} cancelled`),
      retry: (job) => void this.mutate("RetryJob", { jobId: job.id }, "retryJob", `#${job.id} queued again`),
      ingest: (itemId) => void this.ingest(itemId),
      openItem: (itemId) => void this.openItem(itemId),
      showMore: (stage) => void this.showMore(stage),
    };
    this.feed = new LiveFeed(token, data.viewer.eventCursor, {
      job: (event) => {
        this.jobEvents++;
        if (event.job) this.state.upsertJob(event.job);
        else {
          const known = this.state.jobs.get(event.jobId);
          if (known) this.state.upsertJob({ ...known, stage: event.to as Stage, updatedAt: event.at });
        }
        const itemId = event.job?.trackerItemId;
        if (itemId && this.panel.itemId === itemId) this.refreshDetailSoon();
        this.render();
      },
      item: (event) => {
        if (event.item) this.state.upsertItem(event.item);
        if (this.panel.itemId === event.itemId) this.refreshDetailSoon();
        this.render();
      },
      status: (live) => { this.live = live; this.render(); },
      refused: (reason) => this.signOut(`Signed out: ${reason}.`),
    });
  }

  start(): void {
    replaceChildren(root, h("div", { class: "board" }, this.headerSlot, this.columnsEl, this.panelEl, this.toastEl));
    this.renderNow();
    this.feed.start();
    this.ticker = window.setInterval(() => this.tick(), 1000);
    void this.readActiveColumns();
  }

  /** Active columns are read whole (in the background), so their counts and the queue
   * depth are exact; finished columns page on demand ("show more"). */
  private async readActiveColumns(): Promise<void> {
    for (const stage of ["QUEUED", "ASSIGNED", "BUILDING", "REVIEW", "TESTING"] as const) {
      let read = this.state.jobsIn(stage).length;
      while ((this.state.columns.get(stage)?.hasNextPage ?? false) && read < ACTIVE_COLUMN_MAX) {
        if (!(await this.nextPage(stage, BACKGROUND_PAGE))) return;
        read += BACKGROUND_PAGE;
      }
    }
  }

  private async nextPage(stage: Stage, first: number): Promise<boolean> {
    const column = this.state.columns.get(stage);
    if (!column || !column.hasNextPage || column.loading) return false;
    column.loading = true;
    try {
      const data = await this.api.run<{ jobs: JobPage }>("Column", { stage, first, after: column.endCursor });
      column.loading = false;
      this.state.addPage(stage, data.jobs);
      return true;
    } catch (error) {
      column.loading = false;
      this.toast(explain(error));
      return false;
    } finally {
      this.render();
    }
  }

  private async showMore(stage: Stage): Promise<void> {
    const column = this.state.columns.get(stage);
    if (!column) return;
    column.shown += PAGE_SIZE;
    if (this.state.jobsIn(stage).length < column.shown) await this.nextPage(stage, PAGE_SIZE);
    this.render();
  }

  private async mutate(name: string, variables: Record<string, unknown>, field: string, done: string): Promise<void> {
    try {
      const data = await this.api.run<Record<string, Job>>(name, variables);
      this.state.upsertJob(data[field]);
      this.toast(done);
    } catch (error) {
      this.toast(explain(error));
    }
    this.render();
  }

  private async ingest(itemId: string): Promise<void> {
    try {
      const data = await this.api.run<{ ingestItemAsJob: { outcome: string; job: Job } }>("IngestItem", { itemId });
      const { outcome, job } = data.ingestItemAsJob;
      this.state.upsertJob(job);
      this.toast(outcome === "CREATED" ? `job #${job.id} created from item #${itemId}` : `item #${itemId} already has job #${job.id}`);
      if (this.panel.itemId === itemId) this.refreshDetailSoon();
    } catch (error) {
      this.toast(explain(error));
    }
    this.render();
  }

  private async loadItems(): Promise<void> {
    const page = this.state.itemsPage;
    try {
      const data = await this.api.run<{ items: { nodes: Item[]; pageInfo: { endCursor: string | null; hasNextPage: boolean } } }>(
        "Items", { first: PAGE_SIZE, after: page.endCursor });
      for (const item of data.items.nodes) this.state.upsertItem(item);
      page.endCursor = data.items.pageInfo.endCursor;
      page.hasNextPage = data.items.pageInfo.hasNextPage;
      page.loaded = true;
    } catch (error) {
      this.toast(explain(error));
    }
    this.render();
  }

  private toggleItems(): void {
    this.panel.open = !this.panel.open;
    this.panel.itemId = null;
    if (this.panel.open && !this.state.itemsPage.loaded) void this.loadItems();
    this.render();
  }

  private async openItem(itemId: string): Promise<void> {
    this.panel = { open: true, itemId, detail: null, jobs: [] };
    this.render();
    await this.loadDetail();
  }

  private refreshDetailSoon(): void {
    window.clearTimeout(this.detailTimer);
    this.detailTimer = window.setTimeout(() => void this.loadDetail(), 150);
  }

  private async loadDetail(): Promise<void> {
    const itemId = this.panel.itemId;
    if (!itemId) return;
    try {
      const data = await this.api.run<{ item: ItemDetail | null; jobs: JobPage }>("ItemDetail", { id: itemId });
      if (this.panel.itemId !== itemId) return;
      if (!data.item) {
        this.toast(`item #${itemId} was not found`);
        this.panel.itemId = null;
      } else {
        this.panel.detail = data.item;
        this.panel.jobs = data.jobs.nodes;
        this.state.upsertItem(data.item);
      }
    } catch (error) {
      this.toast(explain(error));
    }
    this.render();
  }

  private signOut(message?: string): void {
    this.feed.stop();
    window.clearInterval(this.ticker);
    window.sessionStorage.removeItem(TOKEN_KEY);
    signInScreen(message);
  }

  private toast(message: string): void {
    replaceChildren(this.toastEl, h("div", { class: "toast-message" }, message));
    window.setTimeout(() => {
      if (this.toastEl.textContent === message) replaceChildren(this.toastEl);
    }, 4000);
  }

  private tick(): void {
    const now = Date.now();
    for (const element of root.querySelectorAll<HTMLElement>("[data-expires]")) {
      element.textContent = leaseLeft(element.dataset.expires as string, now);
    }
  }

  /** Render on the next frame, once however many events arrived. */
  private render(): void {
    if (this.frame) return;
    this.frame = window.requestAnimationFrame(() => { this.frame = 0; this.renderNow(); });
  }

  private renderNow(): void {
    (root.firstElementChild as HTMLElement | null)?.setAttribute("data-job-events", String(this.jobEvents));
    replaceChildren(this.headerSlot, header(this.state, this.productId, this.role, this.live, {
      items: () => this.toggleItems(),
      signOut: () => this.signOut(),
    }));
    const scroll = new Map<string, number>();
    for (const cards of this.columnsEl.querySelectorAll<HTMLElement>("[data-column]")) {
      scroll.set(cards.dataset.column as string, cards.querySelector(".cards")?.scrollTop ?? 0);
    }
    const left = this.columnsEl.scrollLeft;
    replaceChildren(this.columnsEl, STAGES.map((stage) => column(this.state, stage, this.role, this.actions)));
    for (const cards of this.columnsEl.querySelectorAll<HTMLElement>("[data-column]")) {
      const body = cards.querySelector(".cards");
      if (body) body.scrollTop = scroll.get(cards.dataset.column as string) ?? 0;
    }
    this.columnsEl.scrollLeft = left;
    this.panelEl.hidden = !this.panel.open;
    const panelScroll = this.panelEl.scrollTop;
    if (this.panel.open) {
      const close = h("button", { type: "button", class: "close", "aria-label": "close", onclick: () => this.toggleItems() }, "×");
      if (this.panel.itemId) {
        replaceChildren(this.panelEl, close, this.panel.detail
          ? itemDetail(this.panel.detail, this.panel.jobs, this.role, this.actions, () => { this.panel.itemId = null; this.render(); })
          : h("p", { class: "muted" }, "loading…"));
      } else {
        replaceChildren(this.panelEl, close, h("h2", {}, "Items"), itemList(this.state, this.role, this.actions, () => void this.loadItems()));
      }
      this.panelEl.scrollTop = panelScroll;
    }
  }
}

const saved = window.sessionStorage.getItem(TOKEN_KEY);
if (saved) void open(saved);
else signInScreen();
