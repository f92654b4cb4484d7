// The board's live feed: two subscriptions (job stages, item statuses) over
// graphql-transport-ws with the `graphql-ws` client.  Each resumes `after` the last
// cursor it applied: on a dropped connection the feed reconnects with exponential
// backoff (with jitter) and subscribes again from those cursors, so the server replays
// exactly what happened meanwhile: nothing missed, nothing twice.  The client's own
// retry is off because it would resubscribe with the original `after`.
import { createClient, type Client } from "graphql-ws";
import type { Item, Job } from "./api";
import { operation } from "./documents";

export interface JobEvent { cursor: string; jobId: string; from: string | null; to: string; at: string; job: Job | null }
export interface ItemEvent { cursor: string; itemId: string; from: string | null; to: string; at: string; item: Item | null }

export interface FeedHandlers {
  job(event: JobEvent): void;
  item(event: ItemEvent): void;
  status(live: boolean): void;
  /** The server refused the token (revoked, or never valid): stop and sign out. */
  refused(reason: string): void;
}

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 5_000;
const SEEN_MAX = 10_000;

class Seen {
  private readonly order: string[] = [];
  private readonly set = new Set<string>();
  /** True the first time a cursor is offered. */
  add(cursor: string): boolean {
    if (this.set.has(cursor)) return false;
    this.set.add(cursor);
    this.order.push(cursor);
    if (this.order.length > SEEN_MAX) this.set.delete(this.order.shift() as string);
    return true;
  }
}

export class LiveFeed {
  private client: Client | null = null;
  private jobCursor: string | null;
  private itemCursor: string | null;
  private readonly seenJobs = new Seen();
  private readonly seenItems = new Seen();
  private failures = 0;
  private timer: number | undefined;
  private stopped = false;
  private generation = 0;

  constructor(
    private readonly token: string,
    cursor: string | null,
    private readonly handlers: FeedHandlers,
    private readonly url = `${window.location.origin.replace(/^http/, "ws")}/graphql`,
  ) {
    this.jobCursor = cursor;
    this.itemCursor = cursor;
  }

  start(): void {
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    window.clearTimeout(this.timer);
    void this.client?.dispose();
    this.client = null;
  }

  private connect(): void {
    if (this.stopped) return;
    const generation = ++this.generation;
    const client = createClient({
      url: this.url,
      connectionParams: { authorization: `Bearer ${this.token}` },
      retryAttempts: 0,
      lazy: true,
      keepAlive: 10_000,
      on: {
        connected: () => {
          if (generation !== this.generation) return;
          this.failures = 0;
          this.handlers.status(true);
        },
        closed: (event) => this.dropped(generation, event),
      },
    });
    this.client = client;
    client.subscribe<{ jobStageChanged: JobEvent }>(
      { query: operation("JobEvents"), variables: { after: this.jobCursor } },
      {
        next: (message) => {
          const event = message.data?.jobStageChanged;
          if (!event || generation !== this.generation) return;
          this.jobCursor = event.cursor;
          if (this.seenJobs.add(event.cursor)) this.handlers.job(event);
        },
        error: (error) => this.dropped(generation, error),
        complete: () => this.dropped(generation),
      },
    );
    client.subscribe<{ itemStatusChanged: ItemEvent }>(
      { query: operation("ItemEvents"), variables: { after: this.itemCursor } },
      {
        next: (message) => {
          const event = message.data?.itemStatusChanged;
          if (!event || generation !== this.generation) return;
          this.itemCursor = event.cursor;
          if (this.seenItems.add(event.cursor)) this.handlers.item(event);
        },
        error: (error) => this.dropped(generation, error),
        complete: () => this.dropped(generation),
      },
    );
  }

  /** The connection (or a subscription on it) ended: show it and try again later,
   * unless the server refused the token (close code 4403), which no retry mends. */
  private dropped(generation: number, reason?: unknown): void {
    if (this.stopped || generation !== this.generation) return;
    const code = (reason as { code?: unknown } | undefined)?.code;
    if (code === 4403 || code === 4401) {
      this.stop();
      this.handlers.status(false);
      this.handlers.refused("the server refused the token");
      return;
    }
    this.generation++; // later callbacks of the dead client are ignored
    this.handlers.status(false);
    const client = this.client;
    this.client = null;
    void client?.dispose();
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.failures);
    this.failures++;
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this.timer = window.setTimeout(() => this.connect(), delay);
  }
}
